"""A tiny real tfds dataset (array_record) built in a directory, without TF.

The images are scikit-learn digits, upscaled and coloured, so a model can
learn them. Images are handed to tfds as PIL images, which tfds stores as PNG
without TensorFlow; the files are then read with the real `tfds.data_source`.
"""

import functools

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

_BUILDERS = {}


@functools.lru_cache(maxsize=1)
def _digits():
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  return sklearn.datasets.load_digits()


def digit_images(num, image_size=(16, 16), num_channels=3, offset=0):
  """Returns `num` digits as uint8 [num, h, w, C] and their labels.

  Each digit is upscaled to `image_size`; with 3 channels it is tinted by a
  fixed per-example colour.
  """
  digits = _digits()
  index = (offset + np.arange(num)) % len(digits.target)
  height, width = image_size
  images = []
  for i in index:
    plane = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
    plane = np.asarray(PIL.Image.fromarray(plane).resize(
        (width, height), PIL.Image.BILINEAR))
    if num_channels == 3:
      tint = np.random.default_rng(int(i)).uniform(0.5, 1.0, 3)
      plane = np.round(plane[..., None] * tint).astype(np.uint8)
    else:
      plane = plane[..., None]
    images.append(plane)
  return np.stack(images), digits.target[index].astype(np.int64)


def _builder_class(name, image_shape, splits):
  """Creates (once per configuration) an unregistered tfds builder class."""
  key = (name, image_shape, tuple(sorted(splits.items())))
  if key in _BUILDERS:
    return _BUILDERS[key]

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Digits upscaled to a small image size.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=image_shape),
            "label": tfds.features.ClassLabel(
                names=[f"digit{i}" for i in range(10)]),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager
    generators, offset = {}, 0
    for split, count in splits.items():
      generators[split] = self._generate_examples(count, offset)
      offset += count
    return generators

  def _generate_examples(self, count, offset):
    images, labels = digit_images(count, image_shape[:2], image_shape[2],
                                  offset)
    for i, (image, label) in enumerate(zip(images, labels)):
      pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1
                                else image)
      yield i, {"image": pil, "label": int(label)}

  attrs = dict(name=name, VERSION=tfds.core.Version("1.0.0"), _info=_info,
               _split_generators=_split_generators,
               _generate_examples=_generate_examples)
  cls = type("TinyDigits_" + name, (tfds.core.GeneratorBasedBuilder,), attrs,
             skip_registration=True)
  _BUILDERS[key] = cls
  return cls


def build_tiny_tfds(data_dir, name="tiny_digits", image_size=(16, 16),
                    num_channels=3, splits=None, file_format="array_record"):
  """Builds a small array_record tfds dataset in `data_dir`; returns its name.

  Args:
    data_dir: tfds data directory to build into.
    name: dataset name (read it back with `tfds.data_source(name,
      data_dir=data_dir)` or `data.get_source(name, ..., data_dir=data_dir)`).
    image_size: (height, width) of the stored images.
    num_channels: 1 or 3.
    splits: {split: number of examples}; default {"train": 200, "test": 50}.
    file_format: tfds file format ("array_record" is the one
      `tfds.data_source` reads).
  """
  splits = dict(splits or {"train": 200, "test": 50})
  image_shape = (int(image_size[0]), int(image_size[1]), int(num_channels))
  builder = _builder_class(name, image_shape, splits)(data_dir=str(data_dir))
  builder.download_and_prepare(
      file_format=file_format,
      download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return name
