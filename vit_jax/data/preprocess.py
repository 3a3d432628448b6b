"""Per-example image preprocessing on the host (numpy and PIL).

Training: inception crop (random resized crop), resize to `image_size`, random
horizontal flip. Evaluation: central crop with the target aspect ratio, resize
to `image_size`. Both end with pixels scaled to [-1, 1] by
`(x - 127.5) / 127.5`. Images are uint8 [H, W, C]; any channel count works.
"""

import math

import numpy as np
import PIL.Image

from vit_jax.sizes import pair

DEFAULT_CROP_AREA = (0.05, 1.0)
DEFAULT_ASPECT_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


def _over_white(image):
  """uint8 [H, W, C + 1] (the last channel alpha) composited over white.

  Equal, bit for bit, to PIL's `alpha_composite` over an opaque white image.
  """
  color = image[..., :-1].astype(np.uint32)
  alpha = image[..., -1:].astype(np.uint32)
  return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _luma(image):
  """uint8 [H, W, 3] -> [H, W, 1]: ITU-R 601-2 luma, as PIL's convert("L").

  PIL's integer formula, so the result equals PIL's bit for bit.
  """
  x = image.astype(np.uint32)
  luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471
          + 0x8000) >> 16
  return luma.astype(np.uint8)[..., None]


def to_channels(image, num_channels):
  """Converts uint8 [H, W, C] to `num_channels` channels (None keeps C).

  The one channel conversion of the project: image files are decoded through
  it (`vit_jax.data.sources.decode_image`), and the loaders apply it to every
  example, so training, evaluation and few-shot see the same pixels.

  C is 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA); `num_channels` 1 or
  3. Alpha is composited over white; RGB -> gray is the ITU-R 601-2 luma of
  PIL's convert("L") (bit for bit); gray -> RGB repeats the plane.
  """
  image = np.asarray(image)
  channels = image.shape[-1]
  if num_channels is None or channels == num_channels:
    return image
  if num_channels not in (1, 3) or channels not in (1, 2, 3, 4):
    raise ValueError(
        f"cannot convert an image with {channels} channels to {num_channels}")
  if channels in (2, 4):
    image = _over_white(image)
    channels -= 1
  if channels == num_channels:
    return image
  if channels == 1:
    return np.repeat(image, 3, axis=-1)
  return _luma(image)


def crop_and_resize(image, box, size):
  """Crops box=(top, left, height, width) of uint8 [H, W, C], resizes it.

  Bilinear resampling with PIL (antialiased when shrinking). Returns uint8
  [size[0], size[1], C].
  """
  top, left, height, width = box
  out_h, out_w = size
  if (top, left) == (0, 0) and image.shape[:2] == (height, width) == (
      out_h, out_w):
    return image
  pil_box = (left, top, left + width, top + height)
  channels = [image] if image.shape[-1] == 3 else np.moveaxis(
      image, -1, 0)[..., None]
  out = []
  for plane in channels:
    pil = PIL.Image.fromarray(plane if plane.shape[-1] == 3 else plane[..., 0])
    resized = pil.resize((out_w, out_h), PIL.Image.BILINEAR, box=pil_box)
    out.append(np.asarray(resized, np.uint8))
  if image.shape[-1] == 3:
    return out[0]
  return np.stack(out, axis=-1)


def central_crop_box(height, width, size, crop_fraction=1.0):
  """The central box with the aspect ratio of `size`.

  The box is the largest one of that aspect ratio inside the image, scaled
  by `crop_fraction`; cropping it and resizing to `size` equals resizing the
  image so that it covers `size / crop_fraction`, then taking the centre.

  Returns:
    (top, left, box_height, box_width).
  """
  out_h, out_w = size
  scale = min(height / out_h, width / out_w) * crop_fraction
  box_h = max(1, min(height, int(round(out_h * scale))))
  box_w = max(1, min(width, int(round(out_w * scale))))
  return ((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)


def inception_crop_box(height, width, rng, area=DEFAULT_CROP_AREA,
                       aspect_ratio=DEFAULT_ASPECT_RATIO):
  """Samples a random resized crop, as in the Inception papers.

  Up to 10 attempts draw an area fraction uniformly from `area` and an
  aspect ratio (width / height) log-uniformly from `aspect_ratio`; the first
  box that fits is returned at a uniform position. If none fits, the fallback
  is a central crop of the whole image with its aspect ratio clipped to
  `aspect_ratio` (like torchvision's RandomResizedCrop).

  Returns:
    (top, left, box_height, box_width).
  """
  min_area, max_area = area
  if not 0 < min_area <= max_area <= 1:
    raise ValueError(f"crop area range must satisfy 0 < min <= max <= 1, "
                     f"got {tuple(area)}")
  log_ratio = (math.log(aspect_ratio[0]), math.log(aspect_ratio[1]))
  for _ in range(_CROP_ATTEMPTS):
    target_area = height * width * rng.uniform(min_area, max_area)
    ratio = math.exp(rng.uniform(*log_ratio))
    box_w = int(round(math.sqrt(target_area * ratio)))
    box_h = int(round(math.sqrt(target_area / ratio)))
    if 0 < box_w <= width and 0 < box_h <= height:
      top = int(rng.integers(0, height - box_h + 1))
      left = int(rng.integers(0, width - box_w + 1))
      return (top, left, box_h, box_w)
  in_ratio = width / height
  if in_ratio < aspect_ratio[0]:
    box_w, box_h = width, max(1, int(round(width / aspect_ratio[0])))
  elif in_ratio > aspect_ratio[1]:
    box_h, box_w = height, max(1, int(round(height * aspect_ratio[1])))
  else:
    box_h, box_w = height, width
  return ((height - box_h) // 2, (width - box_w) // 2, box_h, box_w)


def normalize(image):
  """uint8 -> float32 in [-1, 1]."""
  return (image.astype(np.float32) - 127.5) / 127.5


def train_image(image, rng, image_size, inception_crop=True,
                crop_area=DEFAULT_CROP_AREA,
                aspect_ratio=DEFAULT_ASPECT_RATIO, flip=True,
                num_channels=None):
  """Training preprocessing of one uint8 image; returns float32 [h, w, C]."""
  size = pair(image_size, "image_size")
  image = to_channels(np.asarray(image), num_channels)
  height, width = image.shape[:2]
  if inception_crop:
    box = inception_crop_box(height, width, rng, crop_area, aspect_ratio)
  else:
    box = central_crop_box(height, width, size)
  image = crop_and_resize(image, box, size)
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return normalize(image)


def eval_image(image, image_size, num_channels=None, crop_fraction=1.0):
  """Evaluation preprocessing of one uint8 image; returns float32 [h, w, C]."""
  size = pair(image_size, "image_size")
  image = to_channels(np.asarray(image), num_channels)
  box = central_crop_box(image.shape[0], image.shape[1], size, crop_fraction)
  return normalize(crop_and_resize(image, box, size))
