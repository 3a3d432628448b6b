"""Image preprocessing on the host, one image or a whole batch at a time.

Training: inception crop (random resized crop), resize to `image_size`, random
horizontal flip. Evaluation: central crop with the target aspect ratio, resize
to `image_size`. Both end with pixels scaled to [-1, 1] by
`(x - 127.5) / 127.5`. Images are uint8 [H, W, C]; any channel count works.

A batch is preprocessed at once (`train_batch`, `eval_batch`): the random
choices of image i are a function of `u[i]`, a row of `RANDOMS_PER_IMAGE`
uniform numbers, and small images of one size are resampled together by
integer matrix products, with no Python work per image. `train_image` and
`eval_image` are the same for one image (and give the same pixels).

Resampling is bilinear, antialiased when shrinking, with PIL's coefficients
and integer rounding (`resize`); the result equals PIL's
`Image.resize(..., BILINEAR, box=...)` up to one level of 255 in a few
pixels (PIL may run its two passes in the other order).
"""

import math

import numpy as np
import PIL.Image

from vit_jax.sizes import pair

DEFAULT_CROP_AREA = (0.05, 1.0)
DEFAULT_ASPECT_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
# Uniform numbers per image: (area, aspect ratio) of each crop attempt, the
# crop's (top, left) position, the flip.
RANDOMS_PER_IMAGE = 2 * _CROP_ATTEMPTS + 3
_POSITION = 2 * _CROP_ATTEMPTS
_FLIP = _POSITION + 2

# Bilinear weights with 22 fractional bits, as PIL's 8-bit resampling.
_PRECISION_BITS = 22
# Images of one size whose two matrix products cost at most this many
# multiply-adds are resampled together; larger ones by PIL one at a time.
_DENSE_MAX_MACS = 1 << 20


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
  """Converts uint8 [..., H, W, C] to `num_channels` channels (None keeps C).

  The one channel conversion of the project: image files are decoded through
  it (`vit_jax.data.sources.decode_image`), and the loaders apply it to every
  example, so training, evaluation and few-shot see the same pixels. A stack
  of images [N, H, W, C] is converted at once.

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


def _weights_of(in_size, out_size, lo, hi):
  """Integer weights [P, out_size, in_size] for P spans [lo, hi) (floats).

  PIL's `precompute_coeffs` and `normalize_coeffs_8bpc` (libImaging/
  Resample.c) with the same float64 operations: row `o` holds the weights,
  in units of 2^-22, with which input pixels make output pixel `o` when the
  span is stretched onto `out_size` pixels; the filter widens by the scale
  when shrinking (antialiasing).
  """
  lo, hi = lo[:, None], hi[:, None]
  scale = (hi - lo) / out_size
  filterscale = np.maximum(scale, 1.0)
  support = filterscale  # The bilinear filter's support is 1.
  center = lo + (np.arange(out_size) + 0.5) * scale            # [P, out]
  first = np.maximum(np.trunc(center - support + 0.5), 0.0)
  stop = np.minimum(np.trunc(center + support + 0.5), in_size)
  pixel = np.arange(in_size, dtype=np.float64)
  x = ((pixel - center[..., None]) + 0.5) * (1.0 / filterscale)[..., None]
  inside = (pixel >= first[..., None]) & (pixel < stop[..., None])
  w = np.where(inside, np.maximum(1.0 - np.abs(x), 0.0), 0.0)
  total = np.cumsum(w, axis=-1)[..., -1:]  # Summed in order, as PIL does.
  w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
  return np.floor(0.5 + w * (1 << _PRECISION_BITS))


# Weights by (in_size, out_size, lo, hi): batches reuse the spans they share.
_WEIGHTS = {}
_WEIGHTS_MAX = 1 << 16


def _resample_weights(in_size, lo, hi, out_size):
  """Integer weights [N, out_size, in_size] of bilinear resampling of the
  spans [lo[n], hi[n]) of an axis of `in_size` pixels (see `_weights_of`)."""
  keys = [(in_size, out_size, a, b) for a, b in zip(
      np.asarray(lo).tolist(), np.asarray(hi).tolist())]
  missing = sorted(set(k for k in keys if k not in _WEIGHTS))
  if missing:
    if len(_WEIGHTS) + len(missing) > _WEIGHTS_MAX:
      _WEIGHTS.clear()
    spans = np.array([k[2:] for k in missing], np.float64)
    for key, w in zip(missing, _weights_of(in_size, out_size, spans[:, 0],
                                           spans[:, 1])):
      _WEIGHTS[key] = w
  return np.stack([_WEIGHTS[k] for k in keys])


def _apply_weights(weights, x):
  """(2^21 + weights @ x) >> 22: one resampling pass, as PIL's 8-bit ones.

  Products and sums are integers below 2^53, so float64 is exact; the
  weights are positive and sum to 2^22 (up to their rounding), so the result
  is in [0, 255].
  """
  s = np.matmul(weights, x)
  s += 1 << (_PRECISION_BITS - 1)
  s *= 1.0 / (1 << _PRECISION_BITS)
  return np.floor(s, out=s)


def _resize_dense(images, boxes, size):
  """`resize` of uint8 [N, H, W, C] images of one size, all at once."""
  _, height, width, _ = images.shape
  top, left, box_h, box_w = boxes.T
  wy = _resample_weights(height, top, top + box_h, size[0])    # [N, h, H]
  wx = _resample_weights(width, left, left + box_w, size[1])   # [N, w, W]
  x = images.transpose(0, 3, 1, 2).astype(np.float64, order="C")
  x = _apply_weights(x, wx.transpose(0, 2, 1)[:, None])         # [N, C, H, w]
  x = _apply_weights(wy[:, None], x)                           # [N, C, h, w]
  return x.transpose(0, 2, 3, 1).astype(np.uint8)


def _resize_pil(image, box, size):
  """`resize` of one uint8 [H, W, C] image by PIL."""
  top, left, height, width = (int(v) for v in box)
  out_h, out_w = size
  pil_box = (left, top, left + width, top + height)
  planes = [image] if image.shape[-1] == 3 else [
      image[..., c] for c in range(image.shape[-1])]
  out = [np.asarray(PIL.Image.fromarray(p).resize(
      (out_w, out_h), PIL.Image.BILINEAR, box=pil_box), np.uint8)
         for p in planes]
  return out[0] if image.shape[-1] == 3 else np.stack(out, axis=-1)


def resize(images, boxes, size):
  """Crops boxes (top, left, height, width) of uint8 images, resizes them.

  Bilinear resampling, antialiased when shrinking (see the module doc).
  Images of one size are resampled together by two integer matrix
  products, or, when that costs more than resampling them one by one (large
  images), by PIL one by one; the choice depends on the image size only, so
  an image's result depends only on it, its box and `size`.

  Args:
    images: uint8 [N, H, W, C], or a list of N uint8 [H_i, W_i, C] arrays.
    boxes: int [N, 4]: (top, left, height, width) inside each image.
    size: (height, width) of the output.

  Returns:
    uint8 [N, size[0], size[1], C].
  """
  boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
  out_h, out_w = size
  if not isinstance(images, np.ndarray):  # Each size on its own.
    shapes = [np.shape(image) for image in images]
    out = np.empty((len(images), out_h, out_w, shapes[0][-1]), np.uint8)
    for shape in set(shapes):
      rows = [i for i, s in enumerate(shapes) if s == shape]
      out[rows] = resize(np.stack([images[i] for i in rows]), boxes[rows],
                         size)
    return out
  _, height, width, channels = images.shape
  if channels * height * out_w * (width + out_h) <= _DENSE_MAX_MACS:
    return _resize_dense(images, boxes, size)
  return np.stack([_resize_pil(image, box, size)
                   for image, box in zip(images, boxes)])


def crop_and_resize(image, box, size):
  """Crops box=(top, left, height, width) of uint8 [H, W, C], resizes it.

  Returns uint8 [size[0], size[1], C] (see `resize`).
  """
  return resize(np.asarray(image)[None], [box], size)[0]


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


def inception_crop_boxes(heights, widths, u, area=DEFAULT_CROP_AREA,
                         aspect_ratio=DEFAULT_ASPECT_RATIO):
  """Random resized crops of N images, as in the Inception papers.

  Up to 10 attempts per image draw an area fraction uniformly from `area`
  and an aspect ratio (width / height) log-uniformly from `aspect_ratio`;
  the first box that fits is placed at a uniform position. If none fits, the
  fallback is a central crop of the whole image with its aspect ratio
  clipped to `aspect_ratio` (like torchvision's RandomResizedCrop).

  Args:
    heights: [N] image heights.
    widths: [N] image widths.
    u: [N, RANDOMS_PER_IMAGE] uniform numbers in [0, 1): the random choices.
    area: (min, max) fraction of the image area.
    aspect_ratio: (min, max) width / height.

  Returns:
    int64 [N, 4]: (top, left, box_height, box_width) per image.
  """
  min_area, max_area = area
  if not 0 < min_area <= max_area <= 1:
    raise ValueError(f"crop area range must satisfy 0 < min <= max <= 1, "
                     f"got {tuple(area)}")
  height = np.asarray(heights, np.float64)[:, None]
  width = np.asarray(widths, np.float64)[:, None]
  u = np.asarray(u, np.float64)
  log_lo, log_hi = math.log(aspect_ratio[0]), math.log(aspect_ratio[1])
  target = height * width * (
      min_area + (max_area - min_area) * u[:, 0:_POSITION:2])
  ratio = np.exp(log_lo + (log_hi - log_lo) * u[:, 1:_POSITION:2])
  box_w = np.round(np.sqrt(target * ratio))
  box_h = np.round(np.sqrt(target / ratio))
  fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  attempt = np.argmax(fits, axis=1)[:, None]
  found = fits.any(axis=1)
  height, width = height[:, 0], width[:, 0]
  box_h = np.take_along_axis(box_h, attempt, 1)[:, 0]
  box_w = np.take_along_axis(box_w, attempt, 1)[:, 0]
  # The fallback: the whole image, its aspect ratio clipped.
  in_ratio = width / height
  narrow, wide = in_ratio < aspect_ratio[0], in_ratio > aspect_ratio[1]
  fall_h = np.where(narrow, np.maximum(
      1, np.round(width / aspect_ratio[0])), height)
  fall_w = np.where(wide, np.maximum(
      1, np.round(height * aspect_ratio[1])), width)
  box_h = np.where(found, box_h, fall_h)
  box_w = np.where(found, box_w, fall_w)
  top = np.where(found, np.floor(u[:, _POSITION] * (height - box_h + 1)),
                 (height - box_h) // 2)
  left = np.where(found, np.floor(u[:, _POSITION + 1] * (width - box_w + 1)),
                  (width - box_w) // 2)
  return np.stack([top, left, box_h, box_w], 1).astype(np.int64)


def inception_crop_box(height, width, rng, area=DEFAULT_CROP_AREA,
                       aspect_ratio=DEFAULT_ASPECT_RATIO):
  """`inception_crop_boxes` of one image, drawing its numbers from `rng`.

  Returns:
    (top, left, box_height, box_width).
  """
  box = inception_crop_boxes([height], [width],
                             rng.random((1, RANDOMS_PER_IMAGE)), area,
                             aspect_ratio)[0]
  return tuple(int(v) for v in box)


def normalize(image):
  """uint8 -> float32 in [-1, 1]."""
  return (image.astype(np.float32) - 127.5) / 127.5


def _converted(images, num_channels):
  """`to_channels` of an array [N, H, W, C] or of each image of a list."""
  if isinstance(images, np.ndarray) and images.ndim == 4:
    return to_channels(images, num_channels)
  return [to_channels(np.asarray(image), num_channels) for image in images]


def _shapes(images):
  if isinstance(images, np.ndarray):
    n, height, width = images.shape[:3]
    return np.full(n, height), np.full(n, width)
  return (np.array([np.shape(i)[0] for i in images]),
          np.array([np.shape(i)[1] for i in images]))


def _central_boxes(heights, widths, size, crop_fraction=1.0):
  boxes = {}
  for shape in set(zip(heights.tolist(), widths.tolist())):
    boxes[shape] = central_crop_box(*shape, size, crop_fraction)
  return np.array([boxes[s] for s in zip(heights.tolist(), widths.tolist())],
                  np.int64).reshape(-1, 4)


def train_batch(images, u, image_size, inception_crop=True,
                crop_area=DEFAULT_CROP_AREA,
                aspect_ratio=DEFAULT_ASPECT_RATIO, flip=True,
                num_channels=None):
  """Training preprocessing of N uint8 images; returns float32 [N, h, w, C].

  Args:
    images: uint8 [N, H, W, C], or a list of N uint8 [H_i, W_i, C] arrays.
    u: [N, RANDOMS_PER_IMAGE] uniform numbers in [0, 1): image i's crop
      (`inception_crop_boxes`) and flip (`u[i, -1] < 0.5`) depend only on
      `u[i]`.
    image_size: int or (height, width) of the output.
    inception_crop: random resized crop; otherwise a central crop.
    crop_area: (min, max) fraction of the image area of the random crop.
    aspect_ratio: (min, max) width / height of the random crop.
    flip: random horizontal flips.
    num_channels: convert to 1 or 3 channels (None keeps them).
  """
  size = pair(image_size, "image_size")
  images = _converted(images, num_channels)
  heights, widths = _shapes(images)
  u = np.asarray(u, np.float64).reshape(len(heights), RANDOMS_PER_IMAGE)
  if inception_crop:
    boxes = inception_crop_boxes(heights, widths, u, crop_area, aspect_ratio)
  else:
    boxes = _central_boxes(heights, widths, size)
  out = resize(images, boxes, size)
  if flip:
    mirrored = u[:, _FLIP] < 0.5
    out[mirrored] = out[mirrored, :, ::-1]
  return normalize(out)


def eval_batch(images, image_size, num_channels=None, crop_fraction=1.0):
  """Evaluation preprocessing of N uint8 images; float32 [N, h, w, C]."""
  size = pair(image_size, "image_size")
  images = _converted(images, num_channels)
  heights, widths = _shapes(images)
  boxes = _central_boxes(heights, widths, size, crop_fraction)
  return normalize(resize(images, boxes, size))


def train_image(image, rng, image_size, inception_crop=True,
                crop_area=DEFAULT_CROP_AREA,
                aspect_ratio=DEFAULT_ASPECT_RATIO, flip=True,
                num_channels=None):
  """Training preprocessing of one uint8 image; returns float32 [h, w, C].

  `train_batch` of the image with `rng.random((1, RANDOMS_PER_IMAGE))`.
  """
  return train_batch(np.asarray(image)[None],
                     rng.random((1, RANDOMS_PER_IMAGE)), image_size,
                     inception_crop, crop_area, aspect_ratio, flip,
                     num_channels)[0]


def eval_image(image, image_size, num_channels=None, crop_fraction=1.0):
  """Evaluation preprocessing of one uint8 image; returns float32 [h, w, C]."""
  return eval_batch(np.asarray(image)[None], image_size, num_channels,
                    crop_fraction)[0]
