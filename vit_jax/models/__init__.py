"""ViT model family: the variant registry and `create`.

  model = models.create("B/16", num_classes=10, image_size=32)
  variables = model.init({"params": rng}, images)
  output, out = model.apply(variables, images, train=False)

Variant names follow the paper: "{size}/{patch}" with size in Ti, S, B, L, H
and hybrids "R50+B/16" (BiT ResNet-50 stages (3, 4, 9), /16 feature map,
1x1 patches) and "R26+S/32" (stages (2, 2, 2, 2), /32). "testing" is a tiny
model for fast tests.
"""

import copy
import dataclasses
from typing import Any, Dict

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

VARIANTS = tuple(_VARIANTS)

FIELDS = tuple(f.name for f in dataclasses.fields(VisionTransformer)
               if f.name not in ("parent", "name"))


def get_config(name: str) -> Dict[str, Any]:
  """Returns the fields of a variant as a new dict."""
  if name not in _VARIANTS:
    raise ValueError(f"unknown model variant {name!r}: known variants are "
                     f"{', '.join(VARIANTS)}")
  return copy.deepcopy(_VARIANTS[name])


def create(name: str, **overrides) -> VisionTransformer:
  """Returns the VisionTransformer of a variant, with fields overridden."""
  config = get_config(name)
  unknown = sorted(set(overrides) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown VisionTransformer field(s) {unknown}: valid "
                     f"fields are {', '.join(FIELDS)}")
  config.update(overrides)
  return VisionTransformer(**config)


__all__ = ["VisionTransformer", "VARIANTS", "FIELDS", "get_config", "create"]
