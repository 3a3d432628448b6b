"""Writes a tiny image folder `root/<split>/<class>/*.png|jpg` for tests."""

import functools
import os

import numpy as np
import PIL.Image
import sklearn.datasets


@functools.lru_cache(maxsize=1)
def _digits():
  return sklearn.datasets.load_digits()


def _digit(index, height, width):
  """Digit `index` upscaled to (height, width), tinted, uint8 RGB."""
  digits = _digits()
  index %= len(digits.target)
  plane = np.round(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
  plane = np.asarray(PIL.Image.fromarray(plane).resize(
      (width, height), PIL.Image.BILINEAR))
  tint = np.random.default_rng(index).uniform(0.5, 1.0, 3)
  return np.round(plane[..., None] * tint).astype(np.uint8)


def make_image_folder(root, classes=("cat", "dog", "fish"), splits=None,
                      image_size=(12, 16), mode="RGB", ext="png",
                      sizes=None):
  """Writes digit images into `root/<split>/<class>/` and returns `root`.

  Args:
    root: directory to create.
    classes: class directory names (labels follow their sorted order).
    splits: {split: images per class}; default {"train": 4, "test": 2}.
    image_size: (height, width) of the images.
    mode: PIL mode of the written files ("RGB", "L", "RGBA"), or a list of
      modes used in turn.
    ext: file extension ("png", "jpg" or "jpeg").
    sizes: optional list of (height, width) used in turn instead of
      `image_size` (images of different sizes).

  Returns:
    `root` as a string.
  """
  splits = dict(splits or {"train": 4, "test": 2})
  modes = [mode] if isinstance(mode, str) else list(mode)
  sizes = list(sizes) if sizes else [tuple(image_size)]
  count = 0
  for split, per_class in splits.items():
    for c, name in enumerate(classes):
      directory = os.path.join(root, split, name)
      os.makedirs(directory, exist_ok=True)
      for i in range(per_class):
        height, width = sizes[count % len(sizes)]
        image = _digit(count * 7 + c, height, width)
        pil = PIL.Image.fromarray(image).convert(modes[count % len(modes)])
        if ext in ("jpg", "jpeg") and pil.mode == "RGBA":
          pil = pil.convert("RGB")
        pil.save(os.path.join(directory, f"{split}_{name}_{i:03d}.{ext}"))
        count += 1
  return str(root)


def truncate(path, fraction=0.5):
  """Cuts the file at `path` to `fraction` of its bytes (a damaged image)."""
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:
    f.write(content[:int(len(content) * fraction)])
  return str(path)


def write_not_an_image(path):
  """Writes a text file at `path` (e.g. named x.jpg): not an image."""
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write("this is not an image\n")
  return str(path)


def damage(root, split="train", classes=("cat", "dog", "fish")):
  """Damages two files of a folder from `make_image_folder`, keeping its count.

  Truncates the first image of the first class to half its bytes, and
  replaces the last image of the last class by a text file named `x.jpg`.

  Returns:
    The two damaged paths, sorted.
  """
  first = os.path.join(str(root), split, classes[0])
  truncated = truncate(os.path.join(first, sorted(os.listdir(first))[0]))
  last = os.path.join(str(root), split, classes[-1])
  os.remove(os.path.join(last, sorted(os.listdir(last))[-1]))
  text = write_not_an_image(os.path.join(last, "x.jpg"))
  return sorted([truncated, text])
