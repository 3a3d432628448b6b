"""Random-access image sources: bundled digits, image folders, tfds datasets.

Every source is a sequence of examples `{"image": uint8 [H, W, C], "label": int}`
with `num_classes`, `class_names` and `num_channels` (C, or None when
unknown) attributes. Sources are plain
random-access objects (`len`, `__getitem__`), which is what grain reads.

Dataset names understood by `get_source`:

- `"digits"`: scikit-learn's 8x8 handwritten digits (1797 images, 10
  classes) with a fixed stratified 80/20 split: "train" (1437) and "test"
  (360). Pixel values 0..16 are mapped to uint8 0..255, shape [8, 8, 1].
- `"folder:/abs/path"`: images in `root/<split>/<class>/*.{jpg,jpeg,png}`.
- `"tfds:name"` or a plain tfds name such as `"cifar10"`: read with
  `tfds.data_source` from array_record files in `data_dir`.
"""

import importlib.util
import os

import numpy as np
import PIL.Image

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Number of files inspected to choose an image folder's channel count.
_MODE_SAMPLE = 64


class DatasetNotPreparedError(FileNotFoundError):
  """A tfds dataset is not prepared in data_dir and cannot be built here."""


class ArraySource:
  """In-memory source over uint8 images [N, H, W, C] and integer labels."""

  def __init__(self, images, labels, num_classes, class_names=None, name=""):
    if len(images) != len(labels):
      raise ValueError(
          f"got {len(images)} images but {len(labels)} labels")
    self.images = np.asarray(images, np.uint8)
    self.labels = np.asarray(labels, np.int64)
    self.num_classes = int(num_classes)
    self.class_names = class_names
    self.name = name
    self.num_channels = self.images.shape[-1] if self.images.ndim == 4 else None

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self.images[index], "label": int(self.labels[index])}

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


def digits_source(split):
  """The bundled digits dataset, split "train" (1437) or "test" (360)."""
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  if split not in ("train", "test"):
    raise ValueError(
        f'unknown split {split!r} for dataset "digits": use "train" or "test"')
  digits = sklearn.datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  train, test = digits_split_indices()
  index = train if split == "train" else test
  return ArraySource(images[index], digits.target[index], num_classes=10,
                     class_names=[str(i) for i in range(10)],
                     name=f"digits:{split}")


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


class FolderSource:
  """Images in `root/<split>/<class>/*.{jpg,jpeg,png}`, decoded with PIL.

  Class names are the sorted subdirectory names of `root/<split>` and labels
  their index. Images are converted to one mode for the whole folder: with
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
          "root/<split>/<class>/*.jpg|jpeg|png")
    split_dir = os.path.join(self.root, split)
    if not os.path.isdir(split_dir):
      found = sorted(d for d in os.listdir(self.root)
                     if os.path.isdir(os.path.join(self.root, d)))
      raise FileNotFoundError(
          f"image folder {self.root} has no split directory {split!r}; "
          f"found splits {found}")
    names = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
    if not names:
      raise ValueError(
          f"{split_dir} has no class subdirectories: expected "
          f"{split_dir}/<class>/*.jpg|jpeg|png")
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
    if num_channels not in (None, 1, 3):
      raise ValueError(f"num_channels must be None, 1 or 3, got {num_channels}")
    if num_channels is None:
      num_channels = self._dominant_channels()
    self.num_channels = num_channels
    self.mode = "L" if num_channels == 1 else "RGB"

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
            "label": int(self.labels[index])}

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
    return {"image": image, "label": int(example[self.label_key])}

  def __repr__(self):
    return (f"TfdsSource(name={self.name!r}, split={self.split!r}, "
            f"len={len(self)})")


def get_source(name, split, data_dir=None, **kwargs):
  """Returns the source for dataset `name` and `split`.

  Args:
    name: "digits", "folder:/abs/path", "tfds:name" or a plain tfds name.
    split: split name; tfds accepts slicing such as "train[:90%]".
    data_dir: tfds data directory (tfds datasets only).
    **kwargs: `num_channels`, `class_names` for folders; `image_key`,
      `label_key` for tfds.
  """
  if name == "digits":
    if kwargs:
      raise ValueError(f"digits takes no options, got {sorted(kwargs)}")
    return digits_source(split)
  if name.startswith("folder:"):
    return FolderSource(name[len("folder:"):], split, **kwargs)
  if name.startswith("tfds:"):
    name = name[len("tfds:"):]
  return TfdsSource(name, split, data_dir=data_dir, **kwargs)
