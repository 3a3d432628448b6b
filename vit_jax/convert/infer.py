"""The model fields implied by a parameter tree (for checkpoints without a config).

Everything structural is read off the shapes: width, depth, heads (from the query
kernel, (D, H, D/H)), mlp_dim, patch size, channels, pooling (cls token / MAPHead /
neither), representation size, number of classes, mask token, MIM decoder and the
hybrid ResNet stem. The image size comes from the position table when its grid is
square; non-square grids need the image size to be given, except with learned 2-D
tables (`pos_embedding_row` / `_col`, posemb="learn2d"), whose shapes give the grid.
Relative position tables in the blocks' attention (`relative_position_bias`,
posemb="relative") give the grid when it is square. The GELU variant and the
LayerNorm epsilon leave no trace in the parameters: they default to the original
checkpoints' (tanh GELU, 1e-6) and can be overridden.
"""

import math
import re

import numpy as np

from vit_jax import npz
from vit_jax import posemb as posemb_lib
from vit_jax.models import resnet as resnet_lib
from vit_jax.models import vit

DEFAULTS = dict(hidden_act="gelu_tanh", layer_norm_eps=1e-6)


def _maybe_int(pair):
  return pair[0] if pair[0] == pair[1] else tuple(pair)


def _resnet(flat):
  """Hybrid stem fields from `block{j}/unit{k}` names, or None."""
  if "conv_root/kernel" not in flat:
    return None
  units = {}
  for key in flat:
    m = re.match(r"block(\d+)/unit(\d+)/", key)
    if m:
      units[int(m.group(1))] = max(units.get(int(m.group(1)), 0), int(m.group(2)))
  num_layers = tuple(units[j] for j in sorted(units))
  width = flat["conv_root/kernel"].shape[-1]
  width_factor = width // 64 if width % 64 == 0 else width / 64
  return dict(num_layers=num_layers, width_factor=width_factor)


def _grid(num_positions, image_size, stride, what):
  """Patch grid from the number of grid positions (and the image size if given)."""
  if image_size is not None:
    h, w = vit.pair(image_size, "image_size")
    if h % stride[0] or w % stride[1]:
      raise ValueError(f"image size {(h, w)} is not divisible by patch size "
                       f"{_maybe_int(stride)}")
    grid = (h // stride[0], w // stride[1])
    if num_positions is not None and grid[0] * grid[1] != num_positions:
      raise ValueError(
          f"{what} has {num_positions} grid positions but image size {(h, w)} "
          f"with patch size {_maybe_int(stride)} gives {grid[0]}x{grid[1]} = "
          f"{grid[0] * grid[1]}: pass the image size the checkpoint was trained at")
    return grid
  if num_positions is None:
    raise ValueError(f"{what} has no position table to read the image size "
                     "from: pass --image_size")
  side = math.isqrt(num_positions)
  if side * side != num_positions:
    raise ValueError(
        f"{what} has {num_positions} grid positions, not a square grid: pass "
        "--image_size=H,W")
  return (side, side)


def _grid_2d(rows, cols, image_size, stride, what):
  """Patch grid of learned 2-D tables: (rows, cols), checked against image_size."""
  if image_size is not None:
    grid = _grid(None, image_size, stride, what)
    if grid != (rows, cols):
      raise ValueError(
          f"{what} has row/column position tables for a {rows}x{cols} grid but "
          f"image size {vit.pair(image_size)} with patch size {_maybe_int(stride)} "
          f"gives {grid[0]}x{grid[1]}: pass the image size the checkpoint was "
          "trained at")
  return (rows, cols)


def _grid_relative(size, prefix, image_size, stride, what):
  """Patch grid of relative position tables of `size` rows ((2h-1)(2w-1) + 3 with cls)."""
  if image_size is not None:
    h, w = _grid(None, image_size, stride, what)
    expected = posemb_lib.relative_table_size((h, w), prefix)
    if expected != size:
      raise ValueError(
          f"{what} has relative position tables of {size} rows but image size "
          f"{vit.pair(image_size)} with patch size {_maybe_int(stride)} gives a "
          f"{h}x{w} grid ({expected} rows): pass the "
          "image size the checkpoint was trained at")
    return (h, w)
  grid = posemb_lib.relative_square_grid(size, prefix)
  if grid is None:
    raise ValueError(
        f"{what} has relative position tables of {size} rows, not (2s - 1)**2 + "
        f"{posemb_lib.relative_extra(prefix)} of a square grid: pass --image_size=H,W")
  return grid


def model_config(params, image_size=None, posemb=None, what="checkpoint"):
  """Returns the VisionTransformer fields of a parameter tree (our layout).

  Args:
    params: nested or flat parameter tree, per-block or stacked.
    image_size: optional int or (h, w); required when the grid is not square or
      the model has no learned position table.
    posemb: kind of position embedding when the tree has no learned table
      ("sincos2d", "sincos1d" or "none"); defaults to "sincos2d". A tree with
      `pos_embedding_row` / `_col` is "learn2d", with `pos_embedding` "learn",
      with `relative_position_bias` in its blocks' attention "relative".
    what: name of the source for error messages.
  """
  flat = npz.unstack_blocks(npz.flatten(params) if any(
      hasattr(v, "items") for v in params.values()) else dict(params))
  if "embedding/kernel" not in flat:
    raise ValueError(f"{what} has no `embedding/kernel`: not a ViT parameter tree")
  shape = lambda k: tuple(np.shape(flat[k]))
  kernel = shape("embedding/kernel")
  width = kernel[-1]
  depth = 0
  while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in flat:
    depth += 1
  if not depth:
    raise ValueError(f"{what} has no encoder blocks (Transformer/encoderblock_0/...)")
  attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
  cfg = dict(DEFAULTS)
  cfg.update(
      hidden_size=width,
      num_layers=depth,
      num_heads=shape(attn + "query/kernel")[1],
      mlp_dim=shape("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")[1],
      patch_size=_maybe_int(kernel[:2]),
      qkv_bias=attn + "query/bias" in flat,
      use_mask_token="mask_token" in flat,
      decoder=any(k.startswith("decoder/") for k in flat),
      representation_size=(shape("pre_logits/kernel")[1]
                           if "pre_logits/kernel" in flat else None),
      num_classes=shape("head/kernel")[1] if "head/kernel" in flat else 0,
      resnet=_resnet(flat),
  )
  if "MAPHead_0/probe" in flat:
    cfg["classifier"] = "map"
  elif "cls" in flat:
    cfg["classifier"] = "token"
  else:
    cfg["classifier"] = "gap"
  cfg["num_channels"] = (shape("conv_root/kernel")[2] if cfg["resnet"]
                         else kernel[2])
  prefix = 1 if cfg["classifier"] == "token" else 0
  num_positions = None
  learn2d = npz.POSEMB_ROW in flat or npz.POSEMB_COL in flat
  relative = "Transformer/encoderblock_0/" + npz.RELATIVE_BIAS
  if learn2d:
    if npz.POSEMB_ROW not in flat or npz.POSEMB_COL not in flat:
      raise ValueError(f"{what} has only one of `{npz.POSEMB_ROW}` and "
                       f"`{npz.POSEMB_COL}`: learned 2-D position embeddings need both")
    cfg["posemb"] = "learn2d"
  elif npz.POSEMB in flat:
    cfg["posemb"] = "learn"
    num_positions = shape(npz.POSEMB)[1] - prefix
  elif relative in flat:
    cfg["posemb"] = "relative"
  else:
    cfg["posemb"] = posemb or "sincos2d"
  stem = resnet_lib.stride(cfg["resnet"]["num_layers"]) if cfg["resnet"] else 1
  stride = (kernel[0] * stem, kernel[1] * stem)
  if learn2d:
    grid = _grid_2d(shape(npz.POSEMB_ROW)[1], shape(npz.POSEMB_COL)[1], image_size,
                    stride, what)
  elif cfg["posemb"] == "relative" and relative in flat:
    grid = _grid_relative(shape(relative)[0], prefix, image_size, stride, what)
  else:
    grid = _grid(num_positions, image_size, stride, what)
  cfg["image_size"] = _maybe_int((grid[0] * stride[0], grid[1] * stride[1]))
  if cfg["decoder"]:
    out = shape("decoder/kernel")[-1]
    if out != stride[0] * stride[1] * cfg["num_channels"]:
      raise ValueError(
          f"{what}: decoder/kernel has {out} output channels, expected "
          f"patch {stride[0]}x{stride[1]} x {cfg['num_channels']} channels")
  return cfg
