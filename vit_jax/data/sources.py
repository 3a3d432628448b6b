"""Random-access image sources: bundled digits, image folders, tfds datasets.

Every source is a sequence of examples `{"image": uint8 [H, W, C], "label"}`
with `num_classes`, `class_names`, `num_channels` (C, or None when unknown)
and `label_dtype` attributes. Sources are plain random-access objects (`len`,
`__getitem__`), which is what grain reads.

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
- `"folder:/abs/path"`: images in `root/<split>/<class>/*.{jpg,jpeg,png}`
  (class labels), or, when `root/<split>/labels.csv` exists, the images it
  lists with float labels: a header `filename,label`, filenames relative to
  `root/<split>/` (subfolders allowed), one image per row in that order.
- `"tfds:name"` or a plain tfds name such as `"cifar10"`: read with
  `tfds.data_source` from array_record files in `data_dir`.
"""

import csv
import importlib.util
import math
import os
import re

import numpy as np
import PIL.Image

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Number of files inspected to choose an image folder's channel count.
_MODE_SAMPLE = 64


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

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index],
            "label": _label_value(self.labels[index], self.label_dtype)}

  def __repr__(self):
    # Stable across runs: grain stores it in the iterator state to validate it.
    return f"ArraySource(name={self.name!r}, len={len(self)})"


def digits_split_indices():
  """Returns (train, test) index arrays of the fixed stratified digits split."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import sklearn.model_selection  # pylint: disable=g-import-not-at-top
  labels = sklearn.datasets.load_digits().target
  train, test = sklearn.model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
      stratify=labels, random_state=DIGITS_SPLIT_SEED)
  return np.sort(train), np.sort(test)


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


def _digits(dataset, split):
  """(images uint8 [n, 8, 8, 1], int labels [n]) of a split of the digits.

  `split` is "train" or "test", optionally sliced ("train[:10%]").
  """
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  train, test = digits_split_indices()
  try:
    base, part = split_slice(split, {"train": len(train), "test": len(test)})
  except ValueError as e:
    raise ValueError(f"dataset \"{dataset}\": {e}") from None
  index = (train if base == "train" else test)[part]
  if not len(index):
    raise ValueError(f"split {split!r} of dataset \"{dataset}\" is empty")
  digits = sklearn.datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images[index], digits.target[index]


def digits_source(split):
  """The bundled digits dataset, split "train" (1437) or "test" (360)."""
  images, labels = _digits("digits", split)
  return ArraySource(images, labels, num_classes=10,
                     class_names=[str(i) for i in range(10)],
                     name=f"digits:{split}")


def digits_value_source(split):
  """Regression demo: the digits images with the digit's value as float32."""
  images, labels = _digits("digits_value", split)
  return ArraySource(images, labels.astype(np.float32), num_classes=None,
                     name=f"digits_value:{split}")


def _is_grayscale(mode):
  return mode in ("1", "L", "LA") or mode.startswith(("I", "F"))


def _decode(path, mode):
  with PIL.Image.open(path) as image:
    if image.mode.startswith(("I", "F")):
      # 16-bit or float grayscale: scale to 8 bits.
      array = np.asarray(image, np.float64)
      peak = 65535.0 if array.max() > 255 else 255.0
      array = np.round(np.clip(array, 0, peak) * (255.0 / peak)).astype(
          np.uint8)[..., None]
      return array if mode == "L" else np.repeat(array, 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info):
      # Composite transparent pixels over white rather than keeping the alpha.
      rgba = image.convert("RGBA")
      background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      image = PIL.Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert(mode), np.uint8)
  return array[..., None] if array.ndim == 2 else array


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
    the sorted subdirectory names of `root/<split>` (or `class_names`) and
    labels their index; `label_dtype` int32.
  - `root/<split>/labels.csv` (float labels, for regression) when that file
    exists: a CSV with a header naming the columns `filename` and `label`
    (other columns are ignored); each row is one image, `filename` relative
    to `root/<split>/` (may be in subfolders), `label` a float. The images
    are those listed, in CSV order; `num_classes` and `class_names` are
    None and `label_dtype` float32. A missing image, a label that is not a
    finite float or a missing column is an error naming the CSV and line.

  Images are converted to one mode for the whole folder: with
  `num_channels=None`, grayscale ("L", 1 channel) when every inspected file is
  grayscale (up to 64 files spread over the folder are inspected), RGB
  (3 channels) otherwise; `num_channels=1` or `3` forces it. Transparent
  pixels are composited over white. Image sizes may differ between files.
  """

  def __init__(self, root, split, num_channels=None, class_names=None):
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
            f"class_names do not apply to {split_dir}, whose {LABELS_CSV} "
            "gives float labels: remove class_names (or the CSV)")
      self.files, self.labels = _read_labels_csv(split_dir)
      self.class_names = None
      self.num_classes = None
      self.label_dtype = FLOAT_LABELS
    else:
      self._read_class_dirs(split_dir, class_names)
      self.label_dtype = INT_LABELS
    if num_channels is None:
      num_channels = self._dominant_channels()
    self.num_channels = num_channels
    self.mode = "L" if num_channels == 1 else "RGB"

  def _read_class_dirs(self, split_dir, class_names):
    """Files and int labels of the `<class>/` subdirectories of a split."""
    names = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
    if not names:
      raise ValueError(
          f"{split_dir} has no class subdirectories: expected "
          f"{split_dir}/<class>/*.jpg|jpeg|png (or a {LABELS_CSV} with "
          "float labels)")
    if class_names is not None:
      unknown = sorted(set(names) - set(class_names))
      if unknown:
        raise ValueError(f"{split_dir} has classes {unknown} that are not in "
                         f"the given class_names {list(class_names)}")
      names = list(class_names)
    files, labels, empty = [], [], []
    for label, name in enumerate(names):
      class_dir = os.path.join(split_dir, name)
      entries = sorted(os.listdir(class_dir)) if os.path.isdir(class_dir) else []
      images = [os.path.join(class_dir, f) for f in entries
                if f.lower().endswith(IMAGE_EXTENSIONS)]
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

  def _dominant_channels(self):
    step = max(1, len(self.files) // _MODE_SAMPLE)
    for path in self.files[::step][:_MODE_SAMPLE]:
      with PIL.Image.open(path) as image:
        if not _is_grayscale(image.mode):
          return 3
    return 1

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    return {"image": _decode(self.files[index], self.mode),
            "label": _label_value(self.labels[index], self.label_dtype)}

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


def get_source(name, split, data_dir=None, **kwargs):
  """Returns the source for dataset `name` and `split`.

  Args:
    name: "digits", "digits_value", "folder:/abs/path", "tfds:name" or a
      plain tfds name (see the module doc).
    split: split name; tfds accepts slicing such as "train[:90%]".
    data_dir: tfds data directory (tfds datasets only).
    **kwargs: `num_channels`, `class_names` for folders; `image_key`,
      `label_key` for tfds.
  """
  if name in ("digits", "digits_value"):
    if kwargs:
      raise ValueError(f"{name} takes no options, got {sorted(kwargs)}")
    return digits_source(split) if name == "digits" else digits_value_source(
        split)
  if name.startswith("folder:"):
    return FolderSource(name[len("folder:"):], split, **kwargs)
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
  return TfdsSource(name, split, data_dir=data_dir, **kwargs)
