"""Random-access image sources: bundled digits, image folders, tfds datasets.

Every source is a sequence of examples `{"image": uint8 [H, W, C], "label"}`
with `num_classes`, `class_names`, `num_channels` (C, or None when unknown),
`label_dtype` and `skipped` attributes. Sources are plain random-access
objects (`len`, `__getitem__`), which is what grain reads.

`skipped` lists the paths (sorted) of the files a source left out because
they are damaged: image folders check every file when they are built (see
`FolderSource`, `check_image`); the other sources have none.
`get_source(..., strict_images=True)` makes a damaged file of a folder an
`errors.Error` ("damaged image <path> (<reason>): remove it, or drop
--config.pp.strict_images ...") instead; the other sources accept and ignore
the option. Image files are decoded by one function, `decode_image`, whose
channel conversion is `vit_jax.data.preprocess.to_channels`, the one the
loaders apply: training, evaluation and few-shot read the same pixels.

Labels are either class indices (`label` an int, `label_dtype` int32,
`num_classes` the class count) or float targets for regression (`label` a
float, `label_dtype` float32, `num_classes` None and `class_names` None).
`label_dtype` is the dtype of the labels in the batches of `vit_jax.data`'s
loaders; a source without the attribute gets the dtype of its first example's
label (floating: float32, otherwise int32; see `label_dtype`).

Dataset names understood by `get_source`:

- `"digits"`: scikit-learn's 8x8 handwritten digits (1797 images, 10
  classes) with a fixed stratified 80/20 split: "train" (1437) and "test"
  (360). Pixel values 0..16 are mapped to uint8 0..255, shape [8, 8, 1].
  Splits may be sliced as in tfds: "train[:10%]", "train[:144]".
- `"digits_value"`: a regression demo: the same images and split as
  `"digits"`, label = the digit's value as a float (0.0 .. 9.0),
  `num_classes` None.
- `"digits_canvas"`: the same digits and split, each drawn at twice its
  size (16x16) at a random but fixed position of a black 32x32 canvas
  (`canvas_digits`): a small offline dataset on which position embeddings
  and pooling matter.
- `"folder:/abs/path"`: images in `root/<split>/<class>/*.{jpg,jpeg,png}`
  (class labels), or, when `root/<split>/labels.csv` exists, the images it
  lists with float labels: a header `filename,label`, filenames relative to
  `root/<split>/` (subfolders allowed), one image per row in that order.
  Damaged files are skipped (or, with `strict_images`, an error). Decoded
  images are kept in memory, up to `CACHE_BYTES` for all folders of the
  process, so that later epochs and evaluations do not decode them again.
- `"tfds:name"` or a plain tfds name such as `"cifar10"`: read with
  `tfds.data_source` from array_record files in `data_dir`.
"""

import concurrent.futures
import csv
import functools
import hashlib
import importlib.util
import math
import os
import re
import threading
import weakref

import numpy as np
import PIL.Image
import PIL.ImageOps

from vit_jax import errors
from vit_jax.data import preprocess

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The image check of a folder: threads, files per task, and the bytes of a
# JPEG's end searched for the end-of-image marker.
CHECK_THREADS = 8
_CHECK_CHUNK = 64
_JPEG_TAIL = 64
_JPEG_EOI = b"\xff\xd9"


# Bytes of decoded folder images kept in memory, for all folder sources of
# a process together (see `FolderSource`).
CACHE_BYTES = 1 << 30


class _CacheBudget:
  """Bytes of decoded images all folder sources of the process may keep."""

  def __init__(self, limit):
    self.limit = limit
    self.lock = threading.Lock()
    self.sources = weakref.WeakSet()

  def keep(self, source, index, image):
    """Stores `image` as example `index` of `source` if the budget allows."""
    decoded = source._decoded  # pylint: disable=protected-access
    with self.lock:
      used = sum(s.cached_bytes for s in self.sources)
      if index in decoded or used + image.nbytes > self.limit:
        return
      decoded[index] = image
      source.cached_bytes += image.nbytes
      self.sources.add(source)


_CACHE = _CacheBudget(CACHE_BYTES)


INT_LABELS = np.dtype(np.int32)
FLOAT_LABELS = np.dtype(np.float32)
LABELS_CSV = "labels.csv"


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset is not prepared in data_dir and cannot be built here."""


def _labels_dtype(dtype):
  """Batch label dtype for labels of numpy `dtype`: float32 or int32."""
  return FLOAT_LABELS if np.issubdtype(dtype, np.floating) else INT_LABELS


def label_dtype(source):
  """The dtype of a source's labels in batches: int32 or float32.

  The source's `label_dtype` attribute when it has one, otherwise decided by
  its first example's label: floating (float, np.float32, ...) gives float32,
  anything else int32.
  """
  dtype = getattr(source, "label_dtype", None)
  if dtype is not None:
    return _labels_dtype(np.dtype(dtype))
  if not len(source):
    return INT_LABELS
  return _labels_dtype(np.asarray(source[0]["label"]).dtype)


def _label_value(label, dtype):
  return float(label) if dtype == FLOAT_LABELS else int(label)


class ArraySource:
  """In-memory source over uint8 images [N, H, W, C] and labels.

  Integer labels (class indices) are stored as int64; float labels
  (regression targets) as float32, with `num_classes` None (or 0).
  `label_dtype` (int32 or float32) defaults to what the labels' dtype is:
  pass it to read e.g. float-typed class indices as classes.
  """

  def __init__(self, images, labels, num_classes=None, class_names=None,
               name="", label_dtype=None):  # pylint: disable=redefined-outer-name
    if len(images) != len(labels):
      raise ValueError(
          f"got {len(images)} images but {len(labels)} labels")
    labels = np.asarray(labels)
    self.label_dtype = _labels_dtype(
        labels.dtype if label_dtype is None else np.dtype(label_dtype))
    self.images = np.asarray(images, np.uint8)
    if self.label_dtype == FLOAT_LABELS:
      self.labels = labels.astype(np.float32)
    else:
      self.labels = labels.astype(np.int64)
    self.num_classes = None if num_classes is None else int(num_classes)
    self.class_names = class_names
    self.name = name
    self.num_channels = self.images.shape[-1] if self.images.ndim == 4 else None
    self.skipped = []

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index],
            "label": _label_value(self.labels[index], self.label_dtype)}

  def __repr__(self):
    # Stable across runs: the loaders store it in the iterator state to
    # validate it.
    return f"ArraySource(name={self.name!r}, len={len(self)})"


# The test examples of the fixed stratified split (indices into scikit-
# learn's 1797 digits): `train_test_split(range(1797), test_size=0.2,
# stratify=labels, random_state=0)`, stored so that loading the digits
# needs no scikit-learn import (about a second); a test checks it.
_DIGITS_TEST = (
    21, 24, 28, 34, 35, 37, 39, 42, 45, 51, 57, 77, 78, 81, 87, 96, 99, 102,
    103, 105, 110, 117, 119, 131, 132, 134, 148, 159, 170, 173, 186, 188,
    197, 198, 202, 204, 205, 211, 214, 227, 240, 243, 245, 252, 254, 264,
    267, 275, 276, 279, 283, 286, 293, 298, 304, 305, 306, 307, 308, 312,
    314, 326, 328, 335, 339, 344, 346, 364, 372, 374, 376, 380, 386, 393,
    397, 403, 405, 407, 410, 413, 417, 420, 423, 425, 430, 433, 440, 442,
    452, 454, 481, 493, 496, 497, 499, 500, 520, 527, 528, 538, 553, 556,
    565, 567, 568, 569, 573, 587, 593, 604, 608, 610, 619, 637, 639, 641,
    649, 652, 666, 667, 675, 694, 700, 701, 702, 704, 705, 709, 716, 719,
    734, 738, 741, 744, 749, 760, 766, 767, 768, 770, 772, 783, 786, 787,
    788, 789, 794, 800, 802, 805, 806, 808, 811, 812, 820, 822, 852, 854,
    855, 860, 865, 876, 885, 888, 890, 899, 900, 905, 908, 918, 926, 929,
    937, 943, 944, 945, 951, 960, 973, 977, 985, 989, 990, 992, 997, 1002,
    1003, 1005, 1006, 1007, 1009, 1010, 1012, 1014, 1016, 1023, 1030, 1035,
    1037, 1038, 1049, 1053, 1056, 1073, 1081, 1086, 1088, 1090, 1096, 1098,
    1101, 1107, 1108, 1116, 1118, 1121, 1123, 1136, 1141, 1148, 1150, 1151,
    1152, 1157, 1159, 1161, 1162, 1167, 1168, 1169, 1173, 1174, 1180, 1187,
    1192, 1204, 1217, 1220, 1221, 1224, 1232, 1233, 1242, 1253, 1261, 1262,
    1264, 1268, 1269, 1270, 1287, 1292, 1296, 1302, 1312, 1319, 1330, 1331,
    1332, 1340, 1350, 1351, 1352, 1353, 1364, 1371, 1372, 1375, 1395, 1404,
    1405, 1406, 1415, 1424, 1429, 1435, 1440, 1442, 1450, 1455, 1466, 1467,
    1470, 1471, 1474, 1476, 1482, 1484, 1487, 1493, 1496, 1497, 1505, 1509,
    1512, 1513, 1520, 1529, 1530, 1532, 1540, 1541, 1542, 1551, 1558, 1560,
    1566, 1567, 1576, 1582, 1592, 1596, 1602, 1606, 1608, 1610, 1613, 1614,
    1617, 1626, 1628, 1629, 1634, 1637, 1645, 1650, 1655, 1660, 1664, 1666,
    1668, 1673, 1674, 1680, 1688, 1691, 1696, 1703, 1704, 1706, 1716, 1717,
    1726, 1728, 1734, 1742, 1745, 1750, 1755, 1758, 1767, 1770, 1771, 1772,
    1776, 1778, 1781, 1787, 1789, 1791)


def digits_split_indices():
  """Returns (train, test) index arrays of the fixed stratified digits split."""
  test = np.array(_DIGITS_TEST, np.int64)
  train = np.setdiff1d(np.arange(len(_digits_data()[1])), test)
  return train, test


@functools.lru_cache(maxsize=1)
def _digits_data():
  """(images float [1797, 8, 8] in 0..16, int labels [1797]) of the digits.

  Read from the file scikit-learn ships (`datasets/data/digits.csv.gz`, as
  its `load_digits` does), without importing scikit-learn; through
  `load_digits` if the file is not there.
  """
  spec = importlib.util.find_spec("sklearn")
  path = spec and os.path.join(os.path.dirname(spec.origin), "datasets",
                               "data", "digits.csv.gz")
  if path and os.path.isfile(path):
    table = np.loadtxt(path, delimiter=",")
    images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
  else:
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    digits = sklearn.datasets.load_digits()
    images, labels = digits.images, digits.target
  images.setflags(write=False)
  return images, labels.astype(np.int64)


_SLICE = re.compile(r"^(\w+)\[(-?\d*)(%?):(-?\d*)(%?)\]$")


def split_slice(split, sizes_by_split):
  """"train[:10%]" -> ("train", slice): tfds-style slicing of a named split.

  Bounds are example counts or percentages (rounded to the nearest
  example), either may be empty or negative: "train[:144]", "train[10%:]",
  "test[-50:]". A plain name gives the whole split.
  """
  m = _SLICE.match(split)
  base = m.group(1) if m else split
  if base not in sizes_by_split:
    raise ValueError(f"unknown split {split!r}: use one of "
                     f"{', '.join(sizes_by_split)}, optionally sliced as "
                     f"{list(sizes_by_split)[0]}[:10%] or [100:200]")
  n = sizes_by_split[base]

  def bound(text, percent):
    if not text:
      return None
    value = int(text)
    return int(math.floor(value * n / 100 + 0.5)) if percent else value

  if not m:
    return base, slice(None)
  return base, slice(bound(m.group(2), m.group(3)),
                     bound(m.group(4), m.group(5)))


DIGITS_CANVAS = 32        # Side of the digits_canvas images.
DIGITS_CANVAS_SEED = 1234  # Positions of the digits on the canvas.


def canvas_digits(images, side=DIGITS_CANVAS, seed=DIGITS_CANVAS_SEED):
  """Each 8x8 digit drawn 2x (16x16) at a random position of a black canvas.

  Positions are fixed by `seed` and the example's index in scikit-learn's
  order, so every split and slice sees the same image for an example.
  """
  n, h, w, c = images.shape
  big = images.repeat(2, axis=1).repeat(2, axis=2)
  offsets = np.random.default_rng(seed).integers(
      0, side - 2 * max(h, w) + 1, size=(n, 2))
  out = np.zeros((n, side, side, c), np.uint8)
  for i, (y, x) in enumerate(offsets):
    out[i, y:y + 2 * h, x:x + 2 * w] = big[i]
  return out


def _digits(dataset, split):
  """(images uint8 [n, 8, 8, 1], int labels [n]) of a split of the digits.

  `split` is "train" or "test", optionally sliced ("train[:10%]").
  """
  train, test = digits_split_indices()
  try:
    base, part = split_slice(split, {"train": len(train), "test": len(test)})
  except ValueError as e:
    raise ValueError(f"dataset \"{dataset}\": {e}") from None
  index = (train if base == "train" else test)[part]
  if not len(index):
    raise ValueError(f"split {split!r} of dataset \"{dataset}\" is empty")
  pixels, labels = _digits_data()
  images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
  if dataset == "digits_canvas":
    images = canvas_digits(images)
  return images[index], labels[index]


def digits_source(split):
  """The bundled digits dataset, split "train" (1437) or "test" (360)."""
  images, labels = _digits("digits", split)
  return ArraySource(images, labels, num_classes=10,
                     class_names=[str(i) for i in range(10)],
                     name=f"digits:{split}")


def digits_canvas_source(split):
  """Digits at random positions on a 32x32 canvas (position matters)."""
  images, labels = _digits("digits_canvas", split)
  return ArraySource(images, labels, num_classes=10,
                     class_names=[str(i) for i in range(10)],
                     name=f"digits_canvas:{split}")


def digits_value_source(split):
  """Regression demo: the digits images with the digit's value as float32."""
  images, labels = _digits("digits_value", split)
  return ArraySource(images, labels.astype(np.float32), num_classes=None,
                     name=f"digits_value:{split}")


def _is_grayscale(mode):
  return mode in ("1", "L", "LA", "La") or mode.startswith(("I", "F"))


def _pixels(image):
  """uint8 [H, W, C] of an open PIL image, C in 1..4, alpha kept."""
  mode = image.mode
  if mode.startswith(("I", "F")):
    # 16-bit grayscale (a PNG opens as "I;16", or "I" in older PIL) spans
    # 0..65535 whatever the image holds: v -> round(v * 255 / 65535), so
    # that brightness does not depend on the image's own maximum. Float
    # grayscale ("F") is taken as 0..255, as PIL's own conversion does.
    array = np.asarray(image, np.float64)
    peak = 255.0 if mode.startswith("F") else 65535.0
    return np.round(np.clip(array, 0, peak) * (255.0 / peak)).astype(
        np.uint8)[..., None]
  if mode in ("1", "L"):
    target = "L"
  elif mode in ("LA", "La"):
    target = "LA"
  elif mode in ("RGBA", "RGBa", "PA") or (
      mode == "P" and "transparency" in image.info):
    target = "RGBA"
  else:
    target = "RGB"
  array = np.asarray(image if mode == target else image.convert(target),
                     np.uint8)
  return array[..., None] if array.ndim == 2 else array


def decode_image(path, num_channels=None):
  """The pixels of image file `path`: uint8 [H, W, num_channels].

  The one decoder of image files: every read of a `FolderSource` (training,
  evaluation, few-shot) goes through it. PIL decodes the file; the channel
  conversion is `preprocess.to_channels`, the same function the loaders
  apply to arrays: transparent pixels are composited over white, RGB becomes
  gray by PIL's luma, gray becomes RGB by repetition; 16-bit grayscale is
  scaled to 8 bits by 255 / 65535 (the format's range, not the image's
  maximum). A JPEG's EXIF orientation (as phone cameras write it) is applied
  first (`PIL.ImageOps.exif_transpose`): the pixels are the upright image.
  `num_channels` None keeps the file's kind: 1 for grayscale files, 3 for
  the others.

  Raises PIL's exceptions (OSError, PIL.UnidentifiedImageError, ...) for a
  file it cannot decode; `FolderSource` turns them into `errors.Error`.
  """
  with PIL.Image.open(path) as image:
    PIL.ImageOps.exif_transpose(image, in_place=True)
    array = _pixels(image)
  if num_channels is None:
    num_channels = 1 if array.shape[-1] <= 2 else 3
  return preprocess.to_channels(array, num_channels)


def _reason(e):
  """A short description of why PIL could not read a file."""
  if isinstance(e, PIL.UnidentifiedImageError):
    return "not an image file PIL can read"
  text = str(e).strip()
  if "truncated" in text.lower():
    return f"truncated file: {text}"
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_image(path):
  """Checks cheaply that PIL can read image file `path`.

  PIL opens the file and `verify()`s it (for PNG this reads every chunk and
  checks its CRC, which finds truncation). A JPEG, for which `verify()`
  checks nothing, must end with the end-of-image marker FF D9 (trailing NUL
  or whitespace allowed); one that does not is decoded in full, so that a
  JPEG with data appended after the marker (e.g. a motion photo) is kept
  while a truncated one is not.

  Returns:
    (reason, mode): `reason` None for a readable file, else why it is not;
    `mode` the file's PIL mode (None when it does not open).
  """
  mode = None
  try:
    with open(path, "rb") as f:
      with PIL.Image.open(f) as image:
        mode, kind = image.mode, image.format
        image.verify()
      if kind in ("JPEG", "MPO"):
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _JPEG_TAIL))
        if not f.read().rstrip(b"\0\t\n\r ").endswith(_JPEG_EOI):
          f.seek(0)
          with PIL.Image.open(f) as image:
            try:
              image.load()
            except Exception as e:  # pylint: disable=broad-except
              return (f"truncated JPEG: no end marker FF D9, "
                      f"{str(e).strip() or type(e).__name__}"), mode
  except Exception as e:  # pylint: disable=broad-except
    return _reason(e), mode
  return None, mode


def _check_chunk(paths):
  return [check_image(p) for p in paths]


def _stat_chunk(paths):
  out = []
  for p in paths:
    try:
      st = os.stat(p)
      out.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n")
    except OSError:
      out.append(f"{p}\0missing\n")
  return out


# Results of `check_images` by the stat of the files checked: sources of the
# same split built again (evaluators, few-shot) do not read the files again.
_CHECKED = {}
_CHECKED_LOCK = threading.Lock()
_CHECKED_MAX = 64


def _chunks(items, size):
  return [items[i:i + size] for i in range(0, len(items), size)]


def check_images(paths, threads=CHECK_THREADS):
  """`check_image` of every path, in `threads` threads.

  The result is a function of the files' contents, so every process that
  checks the same files gets the same answer. It is remembered (per list of
  paths, sizes and modification times) for the life of the process.

  Returns:
    (bad, grayscale): `bad` {path: reason} of the unreadable files;
    `grayscale` whether every readable file is grayscale.
  """
  paths = list(paths)
  if not paths:
    return {}, True
  chunks = _chunks(paths, _CHECK_CHUNK)
  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(threads, len(chunks)))) as pool:
    digest = hashlib.sha256()
    for lines in pool.map(_stat_chunk, chunks):
      digest.update("".join(lines).encode("utf-8", "surrogateescape"))
    key = digest.hexdigest()
    with _CHECKED_LOCK:
      cached = _CHECKED.get(key)
    if cached is not None:
      return dict(cached[0]), cached[1]
    results = [r for part in pool.map(_check_chunk, chunks) for r in part]
  bad = {p: reason for p, (reason, _) in zip(paths, results) if reason}
  grayscale = all(_is_grayscale(mode) for reason, mode in results
                  if not reason)
  with _CHECKED_LOCK:
    if len(_CHECKED) >= _CHECKED_MAX:
      _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = (dict(bad), grayscale)
  return bad, grayscale


STRICT_IMAGES_HINT = "--config.pp.strict_images=True makes this an error"


def skipped_warning(skipped, what, hint=STRICT_IMAGES_HINT):
  """The warning line for the damaged files `skipped` (paths) of `what`.

  `what` names the split, e.g. "folder:/data test"; at most three paths are
  listed. `hint` (optional) is added in parentheses.
  """
  listed = ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else "")
  return (f"warning: skipped {len(skipped)} damaged image file(s) of {what}: "
          f"{listed}" + (f" ({hint})" if hint else ""))


def _hidden(name):
  """Whether a file or folder name is hidden (".ipynb_checkpoints", ...)."""
  return name.startswith(".")


def _read_labels_csv(split_dir):
  """(files, float32 labels) listed in `split_dir/labels.csv`, in CSV order."""
  path = os.path.join(split_dir, LABELS_CSV)
  files, labels = [], []
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f)
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in ("filename", "label") if c not in header]
    if missing:
      raise ValueError(
          f"{path} line 1: the header {header} lacks the column(s) {missing}: "
          "the first line must name the columns filename and label")
    file_col, label_col = header.index("filename"), header.index("label")
    for row in reader:
      line = reader.line_num
      if not any(field.strip() for field in row):
        continue  # blank line
      if len(row) <= max(file_col, label_col):
        raise ValueError(
            f"{path} line {line}: expected the columns {header}, got {row}")
      name, value = row[file_col].strip(), row[label_col].strip()
      try:
        label = float(value)
      except ValueError:
        label = None
      if label is None or not np.isfinite(label):
        raise ValueError(
            f"{path} line {line}: label {value!r} of {name!r} is not a "
            "finite float number: fix the label")
      if not name or os.path.isabs(name):
        raise ValueError(
            f"{path} line {line}: filename {name!r} must be a path relative "
            f"to {split_dir}")
      file = os.path.join(split_dir, name)
      if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path} line {line}: image {name!r} does not exist ({file}): "
            "fix the filename or remove the row")
      files.append(file)
      labels.append(label)
  if not files:
    raise ValueError(f"{path} lists no images: add rows `filename,label`")
  return files, np.asarray(labels, np.float32)


class FolderSource:
  """Images in an image folder, decoded with PIL.

  Two layouts, decided per split:

  - `root/<split>/<class>/*.{jpg,jpeg,png}` (class labels): class names are
    the sorted subdirectory names of `root/<split>` and labels their index;
    `label_dtype` int32. Hidden folders and files (names starting with ".",
    such as `.ipynb_checkpoints/`) are neither classes nor images. With
    `class_names` given (the training split's, for the other splits) labels
    are indices into that list: a split may lack some of the classes (it has
    no examples of them), while a class folder not in the list is an error.
  - `root/<split>/labels.csv` (float labels, for regression) when that file
    exists: a CSV with a header naming the columns `filename` and `label`
    (other columns are ignored); each row is one image, `filename` relative
    to `root/<split>/` (may be in subfolders), `label` a float. The images
    are those listed, in CSV order; `num_classes` and `class_names` are
    None and `label_dtype` float32. A missing image, a label that is not a
    finite float or a missing column is an error naming the CSV and line.

  Images are converted to one channel count for the whole folder,
  `num_channels`: with None, 1 (grayscale) when every readable file is
  grayscale, 3 (RGB) otherwise; 1 or 3 forces it. Every image is decoded by
  `decode_image` to that count (a grayscale PNG among RGB JPEGs becomes 3
  channels). Transparent pixels are composited over white. Image sizes may
  differ between files.

  Damaged files: when the source is built, every listed file is checked
  (`check_images`: PIL opens and verifies it; a JPEG must end with its end
  marker), in threads, once. Files that fail are left out, in the same way
  on every process: `skipped` lists their paths (sorted) and `skip_reasons`
  maps each to why. With `strict_images=True` the first of them (in sorted
  order) is an `errors.Error` instead. A file that still fails to decode
  when read is an `errors.Error` naming it.

  Decoded images are kept (read-only) in memory once read, while the folder
  sources of the process hold less than `CACHE_BYTES` together: a folder
  that fits is decoded once, in its first epoch, and its later epochs read
  memory only (`cached_bytes` says how much this source holds).
  """

  def __init__(self, root, split, num_channels=None, class_names=None,
               strict_images=False):
    self.root = os.path.abspath(root)
    self.split = split
    if not os.path.isdir(self.root):
      raise FileNotFoundError(
          f"image folder {self.root} does not exist: expected "
          f"root/<split>/<class>/*.jpg|jpeg|png or root/<split>/{LABELS_CSV}")
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      found = sorted(d for d in os.listdir(self.root)
                     if os.path.isdir(os.path.join(self.root, d)))
      raise FileNotFoundError(
          f"image folder {self.root} has no split directory {split!r}; "
          f"found splits {found}")
    if num_channels not in (None, 1, 3):
      raise ValueError(f"num_channels must be None, 1 or 3, got {num_channels}")
    if os.path.isfile(os.path.join(split_dir, LABELS_CSV)):
      if class_names is not None:
        raise ValueError(
            f"{split_dir} has a {LABELS_CSV} (float labels) but class names "
            "were given (the training split's class folders): lay out every "
            f"split the same way, class folders or a {LABELS_CSV}")
      self.files, self.labels = _read_labels_csv(split_dir)
      self.class_names = None
      self.num_classes = None
      self.label_dtype = FLOAT_LABELS
    else:
      self._read_class_dirs(split_dir, class_names)
      self.label_dtype = INT_LABELS
    grayscale = self._skip_damaged(split_dir, strict_images)
    if num_channels is None:
      num_channels = 1 if grayscale else 3
    self.num_channels = num_channels
    self.mode = "L" if num_channels == 1 else "RGB"
    self._decoded = {}
    self.cached_bytes = 0

  def _skip_damaged(self, split_dir, strict):
    """Leaves out the files `check_images` rejects; returns `grayscale`."""
    bad, grayscale = check_images(self.files)
    self.skipped = sorted(bad)
    self.skip_reasons = {p: bad[p] for p in self.skipped}
    if not bad:
      return grayscale
    first = self.skipped[0]
    if strict:
      raise errors.Error(
          f"image folder {split_dir}: damaged image {first} "
          f"({bad[first]}): remove it, or drop --config.pp.strict_images "
          "to skip damaged files")
    if len(bad) == len(self.files):
      raise errors.Error(
          f"image folder {split_dir}: none of its {len(bad)} images can be "
          f"read, e.g. {first} ({bad[first]}): check the files")
    keep = np.array([f not in bad for f in self.files])
    self.files = [f for f, k in zip(self.files, keep) if k]
    self.labels = self.labels[keep]
    return grayscale

  def _read_class_dirs(self, split_dir, class_names):
    """Files and int labels of the `<class>/` subdirectories of a split."""
    names = sorted(d for d in os.listdir(split_dir)
                   if not _hidden(d) and
                   os.path.isdir(os.path.join(split_dir, d)))
    if not names:
      raise ValueError(
          f"{split_dir} has no class subdirectories: expected "
          f"{split_dir}/<class>/*.jpg|jpeg|png (or a {LABELS_CSV} with "
          "float labels)")
    if class_names is not None:
      class_names = [str(n) for n in class_names]
      unknown = sorted(set(names) - set(class_names))
      if unknown:
        known = str(class_names)
        if len(class_names) > 10:
          known = (f"{str(class_names[:10])[:-1]}, ... "
                   f"({len(class_names)} in all)]")
        raise ValueError(
            f"{split_dir} has class folder(s) {unknown} that are not among "
            f"the training classes {known}: a model trained on those "
            "cannot predict them; remove the folder(s) or train with them")
      names = class_names
    files, labels, empty = [], [], []
    for label, name in enumerate(names):
      class_dir = os.path.join(split_dir, name)
      entries = sorted(os.listdir(class_dir)) if os.path.isdir(class_dir) else []
      images = [os.path.join(class_dir, f) for f in entries
                if not _hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS)]
      if not images and class_names is None:
        empty.append(name)
      files.extend(images)
      labels.extend([label] * len(images))
    if empty:
      raise ValueError(
          f"class directories without .jpg/.jpeg/.png images in {split_dir}: "
          f"{empty}")
    self.files = files
    self.labels = np.asarray(labels, np.int64)
    self.class_names = names
    self.num_classes = len(names)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    index = int(index)
    image = self._decoded.get(index)
    if image is None:
      image = self._decode(index)
    return {"image": image,
            "label": _label_value(self.labels[index], self.label_dtype)}

  def _decode(self, index):
    path = self.files[index]
    try:
      image = decode_image(path, self.num_channels)
    except Exception as e:  # pylint: disable=broad-except
      raise errors.Error(
          f"cannot decode image {path} ({_reason(e)}): remove or replace the "
          "file (files found damaged when the source is built are skipped)"
      ) from e
    image.setflags(write=False)
    _CACHE.keep(self, index, image)
    return image

  def __getstate__(self):
    # Worker processes start with an empty cache.
    return dict(self.__dict__, _decoded={}, cached_bytes=0)

  def __repr__(self):
    return (f"FolderSource(root={self.root!r}, split={self.split!r}, "
            f"mode={self.mode!r}, len={len(self)})")


def _tensorflow_available():
  return importlib.util.find_spec("tensorflow") is not None


def _prepared_builder(name, data_dir):
  """Returns the tfds builder of `name`, building it when TF is available."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"tfds dataset {name!r} is neither a registered tfds dataset nor "
        f"prepared in {where}: check the name, or point data_dir at a "
        "directory that holds it") from e
  if builder.is_prepared():
    return builder
  if not _tensorflow_available():
    raise DatasetNotPreparedError(
        f"tfds dataset {name!r} is not prepared in {where}, and building it "
        'needs TensorFlow: pip install "vit_jax[tf]" (or point data_dir at a '
        "prepared copy in array_record format)")
  builder.download_and_prepare(file_format="array_record")
  return builder


def _tfds_label_dtype(feature):
  """int32 for class labels (ClassLabel, ints), float32 for float features."""
  if getattr(feature, "num_classes", None):
    return INT_LABELS
  try:
    # `np_dtype`, not `dtype`: the latter needs TensorFlow.
    return _labels_dtype(np.dtype(feature.np_dtype))
  except (AttributeError, TypeError):
    return INT_LABELS


class TfdsSource:
  """A tfds dataset read with `tfds.data_source` (array_record, no TF)."""

  def __init__(self, name, split, data_dir=None, image_key="image",
               label_key="label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _prepared_builder(name, data_dir)
    self.name = name
    self.split = split
    self.image_key = image_key
    self.label_key = label_key
    features = builder.info.features
    for key in (image_key, label_key):
      if key not in features:
        raise KeyError(
            f"tfds dataset {name!r} has no feature {key!r}; its features are "
            f"{sorted(features.keys())}: set image_key / label_key")
    shape = getattr(features[image_key], "shape", None)
    self.num_channels = shape[-1] if shape and len(shape) == 3 else (
        1 if shape and len(shape) == 2 else None)
    label = features[label_key]
    self.num_classes = getattr(label, "num_classes", None)
    names = getattr(label, "names", None)
    self.class_names = list(names) if names else None
    self.label_dtype = _tfds_label_dtype(label)
    self.skipped = []
    try:
      self._source = tfds.data_source(
          name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as e:
      raise ValueError(
          f"tfds dataset {name!r} in {builder.data_dir} is not stored as "
          "array_record, which tfds.data_source needs: rebuild it with "
          'download_and_prepare(file_format="array_record")') from e

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    example = self._source[int(index)]
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    return {"image": image,
            "label": _label_value(example[self.label_key], self.label_dtype)}

  def __repr__(self):
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, "
            f"len={len(self)})")


def get_source(name, split, data_dir=None, strict_images=False,
               class_names=None, **kwargs):
  """Returns the source for dataset `name` and `split`.

  Args:
    name: "digits", "digits_value", "digits_canvas", "folder:/abs/path",
      "tfds:name" or a plain tfds name (see the module doc).
    split: split name; tfds accepts slicing such as "train[:90%]".
    data_dir: tfds data directory (tfds datasets only; ignored otherwise).
    strict_images: image folders: a damaged image file is an `errors.Error`
      rather than skipped (see `FolderSource`). Ignored by the other
      sources, whose files cannot be damaged in that way.
    class_names: image folders with class subfolders: the classes in label
      order, normally the training split's `class_names`, so that every
      split maps a class name to the index the model was trained with (see
      `FolderSource`). Ignored by the other sources, whose classes are fixed
      by the dataset.
    **kwargs: `num_channels` for folders; `image_key`, `label_key` for tfds.
  """
  bundled = {"digits": digits_source, "digits_value": digits_value_source,
             "digits_canvas": digits_canvas_source}
  if name in bundled:
    if kwargs:
      raise ValueError(f"{name} takes no options, got {sorted(kwargs)}")
    return bundled[name](split)
  if name.startswith("folder:"):
    return FolderSource(name[len("folder:"):], split,
                        class_names=class_names,
                        strict_images=bool(strict_images), **kwargs)
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
  return TfdsSource(name, split, data_dir=data_dir, **kwargs)
