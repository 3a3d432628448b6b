"""Position-embedding tables and their resampling to another patch grid.

Fixed tables:
  * `sincos2d`: the 2-D sine-cosine table of big_vision (`posemb_sincos_2d`).
  * `sincos1d`: the 1-D sinusoid table of the Transformer ("Attention is all
    you need"), sin on even and cos on odd channels.

Resampling a [1, prefix + h * w, D] table to a new (h, w) grid keeps the
prefix (cls) positions as they are and interpolates the grid. Each ecosystem
uses its own method, and they are not interchangeable:
  * "zoom": `scipy.ndimage.zoom(order=1)`, the original ViT fine-tuning code.
  * "bicubic": torch `F.interpolate(mode="bicubic", align_corners=False)`
    without antialias, as Hugging Face's `interpolate_pos_encoding`.
  * "bilinear": torch `F.interpolate(mode="bilinear", align_corners=False)`
    without antialias, as timm's checkpoint loader.
"bicubic" and "bilinear" are separable linear maps built in numpy from the
static grid sizes; applying them works on numpy arrays and inside `jax.jit`.

Relative position bias (posemb="relative", as BEiT / Swin): a table
[(2h - 1) * (2w - 1) + extra, heads] per block, indexed by the offset between
two patches (`relative_position_index`); with a cls token, `extra` = 3 entries
for cls -> patch, patch -> cls and cls -> cls. At another grid its
(2h - 1, 2w - 1) part is resampled per head (`resample_relative`).
"""

import math

import jax.numpy as jnp
import numpy as np

from vit_jax.sizes import pair

METHODS = ("zoom", "bicubic", "bilinear")

_CUBIC_A = -0.75  # torch's cubic convolution coefficient.


def sincos2d(h: int, w: int, dim: int,
             temperature: float = 10_000.) -> np.ndarray:
  """Returns the fixed 2-D sine-cosine table [1, h * w, dim] (float32).

  Channels are [sin(x), cos(x), sin(y), cos(y)], each dim // 4 wide, with
  frequencies 1 / temperature ** linspace(0, 1, dim // 4); x runs along the
  width, y along the height, positions in row-major (h, w) order.
  """
  if dim % 4:
    raise ValueError(
        f"sincos2d position embeddings need a width divisible by 4, got {dim}")
  quarter = dim // 4
  y, x = np.mgrid[:h, :w]
  omega = np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1)
  omega = 1. / (temperature**omega)
  y = np.einsum("m,d->md", y.reshape(-1).astype(np.float64), omega)
  x = np.einsum("m,d->md", x.reshape(-1).astype(np.float64), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe.astype(np.float32)[None]


def sincos1d(n: int, dim: int, temperature: float = 10_000.) -> np.ndarray:
  """Returns the Transformer's fixed sinusoid table [1, n, dim] (float32).

  table[p, 2i] = sin(p / temperature ** (2i / dim)),
  table[p, 2i + 1] = cos(p / temperature ** (2i / dim)).
  """
  pos = np.arange(n, dtype=np.float64)[:, None]
  channel = np.arange(dim)
  angle = pos / np.power(temperature, 2 * (channel // 2) / dim)[None, :]
  table = np.where(channel % 2 == 0, np.sin(angle), np.cos(angle))
  return table.astype(np.float32)[None]


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights of the 4 taps floor-1 .. floor+2 for fractional offsets t."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def interpolation_matrix(in_size: int, out_size: int,
                         method: str) -> np.ndarray:
  """Returns the [out_size, in_size] matrix of torch's 1-D resize.

  torch semantics with an explicit output size, align_corners=False and no
  antialias: source coordinate (dst + 0.5) * in / out - 0.5; bilinear clamps
  it at 0, bicubic does not, and both clamp the taps to the border.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = (dst + np.float32(0.5)) * scale - np.float32(0.5)
  mat = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "bilinear":
    src = np.maximum(src, 0).astype(np.float64)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    np.add.at(mat, (rows, i0), 1 - lam)
    np.add.at(mat, (rows, i1), lam)
  elif method == "bicubic":
    src = src.astype(np.float64)
    i0 = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - i0)
    for k in range(4):
      idx = np.clip(i0 - 1 + k, 0, in_size - 1)
      np.add.at(mat, (rows, idx), weights[:, k])
  else:
    raise ValueError(
        f"unknown interpolation method {method!r}: use 'bilinear' or 'bicubic'")
  return mat.astype(np.float32)


def resample(posemb, old_grid, new_grid, num_prefix_tokens: int = 1,
             method: str = "bicubic"):
  """Resamples a [1, P + h * w, D] position embedding to a new (h, w) grid.

  Args:
    posemb: numpy or jax array [1, num_prefix_tokens + h * w, D].
    old_grid: (h, w) of the table (an int means square).
    new_grid: (new_h, new_w) wanted.
    num_prefix_tokens: leading positions (cls) that are kept unchanged.
    method: "zoom" (scipy, numpy only), "bicubic" or "bilinear" (torch).

  Returns:
    [1, num_prefix_tokens + new_h * new_w, D], numpy for numpy input (and
    always for "zoom"), a jax array otherwise.
  """
  old_h, old_w = pair(old_grid, "grid")
  new_h, new_w = pair(new_grid, "grid")
  if method not in METHODS:
    raise ValueError(
        f"unknown resample method {method!r}: use one of {METHODS}")
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(
        f"position embeddings must be [1, positions, D], got {posemb.shape}")
  expected = num_prefix_tokens + old_h * old_w
  if posemb.shape[1] != expected:
    raise ValueError(
        f"position embeddings have {posemb.shape[1]} positions, expected "
        f"{expected} = {num_prefix_tokens} prefix + {old_h}x{old_w} grid")
  dim = posemb.shape[-1]
  prefix = posemb[:, :num_prefix_tokens]
  grid = posemb[0, num_prefix_tokens:].reshape(old_h, old_w, dim)
  if method == "zoom":
    grid = np.asarray(grid, dtype=np.float32)
    zoom = (new_h / old_h, new_w / old_w, 1)
    import scipy.ndimage  # pylint: disable=g-import-not-at-top
    new = scipy.ndimage.zoom(grid, zoom, order=1)
    new = new.reshape(1, new_h * new_w, dim)
    return np.concatenate([np.asarray(prefix, np.float32), new], axis=1)
  mat_h = interpolation_matrix(old_h, new_h, method)
  mat_w = interpolation_matrix(old_w, new_w, method)
  if isinstance(posemb, np.ndarray):
    new = np.einsum("yh,hwd->ywd", mat_h, grid.astype(np.float32))
    new = np.einsum("xw,ywd->yxd", mat_w, new)
    new = new.astype(posemb.dtype).reshape(1, new_h * new_w, dim)
    return np.concatenate([prefix, new], axis=1)
  dtype = posemb.dtype
  grid = grid.astype(jnp.float32)
  hi = "highest"
  new = jnp.einsum("yh,hwd->ywd", mat_h, grid, precision=hi)
  new = jnp.einsum("xw,ywd->yxd", mat_w, new, precision=hi)
  new = new.astype(dtype).reshape(1, new_h * new_w, dim)
  return jnp.concatenate([prefix, new], axis=1)


def relative_extra(num_prefix_tokens: int) -> int:
  """Entries of a relative table past the patch offsets: 3 with a cls token."""
  if num_prefix_tokens not in (0, 1):
    raise ValueError(f"relative position bias supports 0 or 1 prefix (cls) "
                     f"tokens, got {num_prefix_tokens}")
  return 3 * num_prefix_tokens


def relative_table_size(grid, num_prefix_tokens: int) -> int:
  """Rows of the relative position table: (2h - 1) * (2w - 1) + extra."""
  h, w = pair(grid, "grid")
  return (2 * h - 1) * (2 * w - 1) + relative_extra(num_prefix_tokens)


def relative_square_grid(size: int, num_prefix_tokens: int):
  """The square grid (s, s) whose relative table has `size` rows, or None
  when `size` is not (2s - 1)**2 + extra."""
  offsets = size - relative_extra(num_prefix_tokens)
  side = math.isqrt(max(offsets, 0))
  if side * side != offsets or side % 2 == 0:
    return None
  return ((side + 1) // 2,) * 2


def relative_position_index(grid, num_prefix_tokens: int) -> np.ndarray:
  """BEiT's `relative_position_index` [T, T] (int32), T = prefix + h * w.

  Patch tokens i = (r1, c1), j = (r2, c2) (row-major) get
  (r1 - r2 + h - 1) * (2w - 1) + (c1 - c2 + w - 1). With a cls token at
  position 0, with n = (2h - 1) * (2w - 1): row 0 (cls -> patch) is n, column
  0 (patch -> cls) n + 1 and [0, 0] (cls -> cls) n + 2.
  """
  h, w = pair(grid, "grid")
  relative_extra(num_prefix_tokens)  # Validates the prefix.
  rows, cols = np.mgrid[:h, :w]
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  dr = rows[:, None] - rows[None, :] + h - 1
  dc = cols[:, None] - cols[None, :] + w - 1
  patches = dr * (2 * w - 1) + dc
  if not num_prefix_tokens:
    return patches.astype(np.int32)
  n = (2 * h - 1) * (2 * w - 1)
  index = np.empty((1 + h * w,) * 2, np.int64)
  index[1:, 1:] = patches
  index[0, :] = n
  index[:, 0] = n + 1
  index[0, 0] = n + 2
  return index.astype(np.int32)


def resample_relative(table, old_grid, new_grid, num_prefix_tokens: int,
                      method: str = "bilinear"):
  """Resamples relative position tables [..., size, heads] to another grid.

  The (2h - 1, 2w - 1) offsets are resized per head (and per leading index,
  e.g. stacked layers) to (2h' - 1, 2w' - 1) with `resample`; the cls entries
  are kept. numpy in, numpy out; jax arrays otherwise.
  """
  old_h, old_w = pair(old_grid, "grid")
  new_h, new_w = pair(new_grid, "grid")
  extra = relative_extra(num_prefix_tokens)
  size = relative_table_size((old_h, old_w), num_prefix_tokens)
  if table.ndim < 2 or table.shape[-2] != size:
    raise ValueError(
        f"relative position table has shape {tuple(table.shape)}, expected "
        f"[..., {size}, heads] for a {old_h}x{old_w} grid")
  xp = np if isinstance(table, np.ndarray) else jnp
  n = size - extra
  lead = table.shape[:-2]
  offsets = xp.moveaxis(table[..., :n, :], -2, 0).reshape(1, n, -1)
  new = resample(offsets, (2 * old_h - 1, 2 * old_w - 1),
                 (2 * new_h - 1, 2 * new_w - 1), 0, method)
  new_n = (2 * new_h - 1) * (2 * new_w - 1)
  new = xp.moveaxis(new.reshape((new_n,) + lead + table.shape[-1:]), 0, -2)
  return xp.concatenate([new.astype(table.dtype), table[..., n:, :]], axis=-2)
