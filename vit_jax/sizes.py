"""Sizes given as an int or a (height, width) pair: the one normaliser.

Image sizes, patch sizes and patch grids are accepted as an int (square), a
1-sequence (square; what `--config.image_size=16` gives for a tuple field) or
a 2-sequence (height, width).
"""

from typing import Sequence, Tuple, Union

import numpy as np

IntOrPair = Union[int, Sequence[int]]


def pair(value: IntOrPair, what: str = "size") -> Tuple[int, int]:
  """Returns (h, w) from an int or a 1- or 2-sequence; ValueError otherwise."""
  if isinstance(value, (int, np.integer)):
    value = (value,)
  try:
    value = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be an int or (height, width), got "
                     f"{value!r}") from None
  if len(value) == 1:
    value = value * 2
  if len(value) != 2:
    raise ValueError(f"{what} must be an int or (height, width), got {value}")
  if min(value) <= 0:
    raise ValueError(f"{what} must be positive, got {value}")
  return value
