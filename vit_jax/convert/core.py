"""Pieces shared by the converters: model fields, position tables, refusals."""

import dataclasses

import numpy as np

from vit_jax import npz
from vit_jax.models import vit as vit_lib


class Unsupported(ValueError):
  """The target cannot express a feature of the model (message names a target that can)."""


def refuse_relative(cfg, target):
  """`Unsupported` for posemb='relative': PyTorch ViT classes add no bias to attention."""
  if cfg.get("posemb") == "relative":
    raise Unsupported(
        f"posemb='relative' (relative position bias in attention) has no "
        f"equivalent in {target}: keep the .npz (--to=npz)")


def full_config(cfg):
  """VisionTransformer fields: the class defaults updated with `cfg`."""
  fields = {f.name: f.default for f in dataclasses.fields(vit_lib.VisionTransformer)
            if f.name not in ("parent", "name")}
  unknown = sorted(set(cfg) - set(fields))
  if unknown:
    raise ValueError(f"unknown VisionTransformer field(s) {unknown}: valid fields "
                     f"are {', '.join(sorted(fields))}")
  fields.update(cfg)
  if fields["resnet"] is not None:
    fields["resnet"] = dict(fields["resnet"])
  return fields


def create(cfg):
  """The flax module for model fields `cfg`."""
  return vit_lib.VisionTransformer(**full_config(cfg))


def grid(cfg):
  """Patch grid (h, w) of the model's image size."""
  return create(cfg).grid_size(cfg["image_size"])


def num_prefix_tokens(cfg):
  return 1 if cfg["classifier"] == "token" else 0


def flat_params(params):
  """Nested or flat, per-block or stacked tree -> flat per-block float32 numpy."""
  if any(hasattr(v, "items") for v in params.values()):
    params = npz.flatten(params)
  flat = npz.unstack_blocks(params)
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def position_table(flat, cfg):
  """The table the model adds to the tokens, [1, prefix + h * w, D].

  Learned tables are the parameter; learned 2-D ones (`learn2d`) are built from the
  row and column parameters (0 at the prefix); fixed ones (sincos) are computed the
  way the model does; `posemb="none"` is a table of zeros. Writing them as a learned
  table is exact.
  """
  kind = cfg["posemb"]
  if kind == "learn":
    return flat[npz.POSEMB]
  prefix = num_prefix_tokens(cfg)
  if kind == "learn2d":
    return vit_lib.learn2d_table(np.asarray(flat[npz.POSEMB_ROW], np.float32),
                                 np.asarray(flat[npz.POSEMB_COL], np.float32),
                                 prefix)
  h, w = grid(cfg)
  if kind == "none":
    return np.zeros((1, prefix + h * w, cfg["hidden_size"]), np.float32)
  return vit_lib.fixed_posemb(kind, (h, w), prefix, cfg["hidden_size"])


def fold_qk_scale(flat, cfg, notes):
  """Folds a custom attention scale into the query projections (exact up to rounding).

  PyTorch targets hard-wire head_dim ** -0.5; q * s / head_dim ** -0.5 keeps the
  attention logits the same.
  """
  scale = cfg.get("qk_scale")
  head_dim = cfg["hidden_size"] // cfg["num_heads"]
  if scale is None or scale == head_dim**-0.5:
    return flat
  ratio = np.float32(scale / head_dim**-0.5)
  flat = dict(flat)
  for key in list(flat):
    if "/MultiHeadDotProductAttention_1/query/" in key:
      flat[key] = flat[key] * ratio
  notes.append(f"qk_scale={scale} folded into the query projections "
               f"(x{float(ratio):.6g}); the exported model uses head_dim**-0.5")
  return flat


def mlp_ratio(cfg):
  """mlp_dim / hidden_size such that int(hidden_size * ratio) == mlp_dim."""
  d, m = cfg["hidden_size"], cfg["mlp_dim"]
  ratio = m / d
  if int(d * ratio) != m:
    ratio = (m + 0.5) / d
  return ratio
