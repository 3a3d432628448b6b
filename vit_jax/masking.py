"""Masks for masked image modeling: bool [batch, num_patches], True = masked.

`block_mask` is SimMIM's generator: random cells of a coarse grid, each
covering `mask_patch_size` x `mask_patch_size` patches (SimMIM's default is a
32 px mask unit on 16 px patches, i.e. 2x2 patches, and a ratio of 0.6).
`example_masks` draws one mask per example from `fold_in(rng, index)`, so a
training step's masks depend only on (seed, step, position in the global
batch): the same on any number of devices or processes, and under `jax.jit`
with any sharding. `random_mask` masks single patches.

The number of masked cells is `ratio * cells` rounded to the nearest integer
(halves up): 0.6 of 4 cells masks 2, 0.6 of 49 masks 29. SimMIM's reference
code rounds up instead, which over-masks small grids (0.6 of 4 would be 3,
i.e. 75%).
"""

import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp

from vit_jax.sizes import pair


def num_masked(num_cells: int, ratio: float) -> int:
  """round(ratio * num_cells), halves up; ValueError outside [0, 1]."""
  if not 0. <= ratio <= 1.:
    raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
  return int(math.floor(num_cells * ratio + 0.5))


def _one_mask(rng, num_cells: int, count: int):
  """Exactly `count` random True entries out of `num_cells`."""
  noise = jax.random.uniform(rng, (num_cells,))
  ranks = jnp.argsort(jnp.argsort(noise))
  return ranks < count


def random_mask(rng, batch: int, num_patches: int, ratio: float):
  """Masks round(ratio * num_patches) random patches per example."""
  return example_masks(rng, jnp.arange(batch), num_patches, ratio)


def cell_grid(grid: Union[int, Sequence[int]], mask_patch_size: int):
  """(h, w) of the coarse grid of cells; ValueError if it does not divide."""
  h, w = pair(grid, "grid")
  s = int(mask_patch_size)
  if s < 1 or h % s or w % s:
    raise ValueError(f"patch grid {(h, w)} is not divisible by "
                     f"mask_patch_size {s}: choose a mask unit that is a "
                     "multiple of the patch size and divides the image")
  return h // s, w // s


def example_masks(rng, indices, grid: Union[int, Sequence[int]],
                  ratio: float = 0.6, mask_patch_size: int = 1):
  """One SimMIM mask per example, from `fold_in(rng, index)`.

  Args:
    rng: a jax PRNG key (or an int seed).
    indices: int [batch], each example's position in the global batch (or
      any id): the mask of an example depends only on `rng` and its index.
    grid: the model's patch grid (h, w), or an int for a square grid; a
      plain int count of patches with `mask_patch_size=1` also works.
    ratio: fraction of cells masked (rounded to the nearest count).
    mask_patch_size: side of a cell, in patches; must divide the grid.

  Returns:
    bool [batch, h * w].
  """
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)
  if isinstance(grid, int) and mask_patch_size == 1:
    grid = (1, grid)
  h, w = pair(grid, "grid")
  ch, cw = cell_grid((h, w), mask_patch_size)
  count = num_masked(ch * cw, ratio)
  s = int(mask_patch_size)

  def one(index):
    cells = _one_mask(jax.random.fold_in(rng, index), ch * cw, count)
    cells = cells.reshape(ch, cw).repeat(s, axis=0).repeat(s, axis=1)
    return cells.reshape(h * w)

  return jax.vmap(one)(jnp.asarray(indices))


def block_mask(rng, batch: int, grid: Union[int, Sequence[int]],
               ratio: float = 0.6, mask_patch_size: int = 1):
  """SimMIM masks for examples 0 .. batch - 1 (see `example_masks`)."""
  return example_masks(rng, jnp.arange(batch), grid, ratio, mask_patch_size)
