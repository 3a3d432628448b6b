"""Model families: the variant registry and `create`.

  model = models.create("B/16", num_classes=10, image_size=32)
  variables = model.init({"params": rng}, images)
  output, out = model.apply(variables, images, train=False)

ViT variant names follow the paper: "{size}/{patch}" with size in Ti, S, B, L,
H and hybrids "R50+B/16" (BiT ResNet-50 stages (3, 4, 9), /16 feature map,
1x1 patches) and "R26+S/32" (stages (2, 2, 2, 2), /32). "testing" is a tiny
model for fast tests.

BiT ResNets (ResNet-v2 of "Big Transfer", `resnet.BiT`, timm's
`resnetv2_{depth}x{width}_bit`) are "BiT-R{depth}x{width}": depth 26 (stages
(2, 2, 2, 2)), 50 (3, 4, 6, 3), 101 (3, 4, 23, 3) or 152 (3, 8, 36, 3), width
1 to 4, e.g. "BiT-R50x1", "BiT-R152x4". They take the fields `BIT_FIELDS`;
`resnet=dict(num_layers=..., width_factor=...)` reshapes them (a partial dict
keeps the variant's other key). Both families are called the same way and
return `(output, out)` with out["pre_logits"].
"""

import copy
import dataclasses
from typing import Any, Dict, Tuple

from vit_jax.models.resnet import BiT
from vit_jax.models.vit import VisionTransformer

_SIZES = {
    # name: (hidden_size, num_layers, num_heads, mlp_dim)
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def _vit(size: str, patch: int) -> Dict[str, Any]:
  hidden, layers, heads, mlp = _SIZES[size]
  return dict(hidden_size=hidden, num_layers=layers, num_heads=heads,
              mlp_dim=mlp, patch_size=patch, image_size=224, num_classes=1000)


def _hybrid(size: str, num_layers, width_factor: int = 1) -> Dict[str, Any]:
  config = _vit(size, 1)
  config["resnet"] = dict(num_layers=tuple(num_layers),
                          width_factor=width_factor)
  return config


_VARIANTS = {
    "testing": dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                    patch_size=8, image_size=32, num_classes=10),
    "Ti/16": _vit("Ti", 16),
    "Ti/32": _vit("Ti", 32),
    "S/8": _vit("S", 8),
    "S/16": _vit("S", 16),
    "S/32": _vit("S", 32),
    "B/8": _vit("B", 8),
    "B/16": _vit("B", 16),
    "B/32": _vit("B", 32),
    "L/16": _vit("L", 16),
    "L/32": _vit("L", 32),
    "H/14": _vit("H", 14),
    "R50+B/16": _hybrid("B", (3, 4, 9)),
    "R26+S/32": _hybrid("S", (2, 2, 2, 2)),
}

# BiT ResNets: units per stage of each depth, widths 1 to 4.
BIT_DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

_BIT_VARIANTS = {
    f"BiT-R{depth}x{width}": dict(
        resnet=dict(num_layers=layers, width_factor=width), image_size=224,
        num_classes=1000)
    for depth, layers in BIT_DEPTHS.items() for width in (1, 2, 3, 4)
}

VARIANTS = tuple(_VARIANTS) + tuple(_BIT_VARIANTS)


def _field_names(cls) -> Tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in ("parent", "name"))


FIELDS = _field_names(VisionTransformer)
BIT_FIELDS = _field_names(BiT)


def _check_name(name: str):
  if name not in _VARIANTS and name not in _BIT_VARIANTS:
    raise ValueError(f"unknown model variant {name!r}: known variants are "
                     f"{', '.join(VARIANTS)}")


def is_bit(name: str) -> bool:
  """Whether `name` is a BiT ResNet variant (ValueError if unknown)."""
  _check_name(name)
  return name in _BIT_VARIANTS


def fields(name: str) -> Tuple[str, ...]:
  """The fields `create(name, ...)` takes: FIELDS or BIT_FIELDS."""
  return BIT_FIELDS if is_bit(name) else FIELDS


def get_config(name: str) -> Dict[str, Any]:
  """Returns the fields of a variant as a new dict.

  For a BiT variant the dict also holds `hidden_size`, the width of its
  pooled features (for recipes that size a layer from a variant's width); it
  is read off the model (`BiT.hidden_size`), not a field `create` takes.
  """
  if is_bit(name):
    config = copy.deepcopy(_BIT_VARIANTS[name])
    config["hidden_size"] = BiT(**config).hidden_size
    return config
  return copy.deepcopy(_VARIANTS[name])


def _bit_config(name: str, overrides) -> Dict[str, Any]:
  """The variant's BiT fields updated with `overrides` (resnet merged)."""
  config = {k: v for k, v in get_config(name).items() if k in BIT_FIELDS}
  unknown = sorted(set(overrides) - set(BIT_FIELDS))
  if unknown:
    raise ValueError(f"unknown BiT field(s) {unknown} for {name} (a ResNet, "
                     "VisionTransformer fields do not apply): valid fields are "
                     f"{', '.join(BIT_FIELDS)}")
  overrides = dict(overrides)
  resnet = overrides.pop("resnet", None)
  if resnet is not None:
    if not hasattr(resnet, "keys"):
      raise ValueError(f"resnet must be a dict(num_layers=..., width_factor="
                       f"...), got {resnet!r}")
    config["resnet"] = dict(config["resnet"], **dict(resnet))
  config.update(overrides)
  return config


def create(name: str, **overrides):
  """Returns the model of a variant (VisionTransformer or BiT), with fields
  overridden; an unknown field is a ValueError listing the valid ones."""
  if is_bit(name):
    return BiT(**_bit_config(name, overrides))
  config = get_config(name)
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown VisionTransformer field(s) {unknown}: valid "
                     f"fields are {', '.join(FIELDS)}")
  config.update(overrides)
  return VisionTransformer(**config)


__all__ = ["VisionTransformer", "BiT", "VARIANTS", "FIELDS", "BIT_FIELDS",
           "BIT_DEPTHS", "is_bit", "fields", "get_config", "create"]
