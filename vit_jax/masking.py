"""Masks for masked image modeling: bool [batch, num_patches], True = masked.

`random_mask` masks a fixed number of random patches per example (jax);
`block_mask` is SimMIM's generator (numpy): random cells of a coarse grid,
each covering `mask_patch_size` x `mask_patch_size` patches.
"""

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np


def num_masked(num_patches: int, ratio: float) -> int:
  if not 0. <= ratio <= 1.:
    raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
  return int(math.ceil(num_patches * ratio))


def random_mask(rng, batch: int, num_patches: int, ratio: float):
  """Masks exactly ceil(ratio * num_patches) random patches per example."""
  count = num_masked(num_patches, ratio)
  noise = jax.random.uniform(rng, (batch, num_patches))
  ranks = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)
  return ranks < count


def block_mask(rng: Union[np.random.Generator, int], batch: int,
               grid: Union[int, Sequence[int]], ratio: float = 0.6,
               mask_patch_size: int = 1) -> np.ndarray:
  """SimMIM masks: ceil(ratio * cells) random cells of a coarse grid.

  Args:
    rng: numpy Generator or seed.
    batch: number of masks.
    grid: patch grid (h, w) of the model (an int means square).
    ratio: fraction of cells masked.
    mask_patch_size: side of a cell, in patches; must divide the grid.

  Returns:
    bool [batch, h * w].
  """
  rng = np.random.default_rng(rng)
  h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
  s = mask_patch_size
  if h % s or w % s:
    raise ValueError(f"patch grid {(h, w)} is not divisible by "
                     f"mask_patch_size {s}")
  ch, cw = h // s, w // s
  count = num_masked(ch * cw, ratio)
  masks = np.zeros((batch, ch * cw), bool)
  for i in range(batch):
    masks[i, rng.permutation(ch * cw)[:count]] = True
  masks = masks.reshape(batch, ch, cw).repeat(s, axis=1).repeat(s, axis=2)
  return masks.reshape(batch, h * w)
