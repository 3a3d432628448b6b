"""Similarity of position embeddings (the ViT paper's Figure 7, centre).

The cosine similarity between the position embedding of every patch and that
of every other patch, [h, w, h, w]: `sim[i, j]` is the similarity map of patch
(i, j), which for a trained model peaks at (i, j) and shows the row/column
structure the model learned. The prefix (cls) positions are left out.

`position_table(params, model)` gives the table a model adds:
- `posemb="learn"`: `Transformer/posembed_input/pos_embedding` from params;
- `posemb="sincos2d"` / `"sincos1d"`: the fixed table (`vit_jax.posemb`),
  computed for the model's grid;
- `posemb="none"`: there is nothing to compare, an `errors.Error`.
"""

import numpy as np

from vit_jax import errors
from vit_jax import posemb as posemb_lib
from vit_jax.analysis import _plot
from vit_jax.sizes import pair


def cosine_similarity(table, grid, num_prefix_tokens=0):
  """Cosine similarity of every patch position with every other.

  Args:
    table: [1, prefix + h * w, D] or [prefix + h * w, D] position embeddings,
      patches in row-major (h, w) order after the prefix.
    grid: patch grid (h, w) or int.
    num_prefix_tokens: leading rows to leave out (1 for a cls position).

  Returns:
    numpy float64 [h, w, h, w]; `sim[i, j, k, l]` is the cosine between the
    embeddings of patches (i, j) and (k, l). A zero row has similarity 0.
  """
  h, w = pair(grid, "grid")
  table = np.asarray(table, np.float64)
  if table.ndim == 3 and table.shape[0] == 1:
    table = table[0]
  if table.ndim != 2 or table.shape[0] != num_prefix_tokens + h * w:
    raise ValueError(
        f"position table of shape {np.shape(table)} does not have "
        f"{num_prefix_tokens} prefix + {h}x{w} rows")
  x = table[num_prefix_tokens:]
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  x = x / np.maximum(norm, 1e-30)
  return (x @ x.T).reshape(h, w, h, w)


def position_table(params, model, grid=None):
  """The patch position embeddings a model adds: ([N, D] numpy, kind).

  Args:
    params: the model's parameters (nested dict).
    model: the VisionTransformer.
    grid: patch grid of a fixed table (default: the model's `image_size`).

  Returns:
    (table, kind): table [h * w, D] without prefix rows, row-major, and a
    description ("learned", "sincos2d (fixed)", ...).
  """
  grid = pair(grid if grid is not None else model.grid_size(model.image_size),
              "grid")
  prefix = model.num_prefix_tokens
  if model.posemb == "learn":
    try:
      table = params["Transformer"]["posembed_input"]["pos_embedding"]
    except (KeyError, TypeError):
      raise errors.Error(
          "the parameters have no Transformer/posembed_input/pos_embedding "
          "although the model has posemb='learn': pass the posemb the model "
          "was trained with, e.g. --override=posemb=sincos2d") from None
    table = np.asarray(table, np.float32)
    if table.ndim == 3:
      table = table[0]
    built = model.grid_size(model.image_size)
    if table.shape[0] != prefix + built[0] * built[1]:
      raise errors.Error(
          f"the learned position table has {table.shape[0]} rows, the model "
          f"expects {prefix} + {built[0]}x{built[1]}")
    return table[prefix:], "learned"
  if model.posemb == "learn2d":
    from vit_jax.models import vit  # pylint: disable=g-import-not-at-top
    tables = params["Transformer"]["posembed_input"]
    table = vit.learn2d_table(
        np.asarray(tables["pos_embedding_row"], np.float32),
        np.asarray(tables["pos_embedding_col"], np.float32), 0)
    return table[0], "learned 2-D (row | column)"
  if model.posemb == "sincos2d":
    return posemb_lib.sincos2d(grid[0], grid[1], model.hidden_size)[0], (
        "sincos2d (fixed)")
  if model.posemb == "sincos1d":
    table = posemb_lib.sincos1d(prefix + grid[0] * grid[1], model.hidden_size)
    return table[0, prefix:], "sincos1d (fixed)"
  raise errors.Error(
      f"the model has no position embeddings (posemb={model.posemb!r}): there "
      "is no position-embedding similarity to show; leave posemb out of "
      "--what")


def mosaic(similarity):
  """[h, w, h, w] -> one [h * (h + 1) - 1, w * (w + 1) - 1] image, NaN gaps.

  Tile (i, j) of the mosaic is the similarity map of patch (i, j).
  """
  h, w = similarity.shape[:2]
  out = np.full((h * (h + 1) - 1, w * (w + 1) - 1), np.nan)
  for i in range(h):
    for j in range(w):
      out[i * (h + 1):i * (h + 1) + h, j * (w + 1):j * (w + 1) + w] = (
          similarity[i, j])
  return out


def plot(similarity, path, title=""):
  """Grid of h x w small maps; map (i, j) is patch (i, j)'s similarity."""
  plt = _plot.pyplot()
  similarity = np.asarray(similarity)
  h, w = similarity.shape[:2]
  image = mosaic(similarity)
  scale = 6.0 / max(image.shape)
  fig, ax = plt.subplots(figsize=(image.shape[1] * scale + 1.6,
                                  image.shape[0] * scale + 0.9))
  cmap = plt.get_cmap("viridis").with_extremes(bad="white")
  shown = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=-1, vmax=1,
                    interpolation="nearest")
  ax.set_xticks([j * (w + 1) + (w - 1) / 2 for j in range(w)])
  ax.set_xticklabels([str(j + 1) if w <= 16 or j % 2 == 0 else ""
                      for j in range(w)], fontsize=7)
  ax.set_yticks([i * (h + 1) + (h - 1) / 2 for i in range(h)])
  ax.set_yticklabels([str(i + 1) if h <= 16 or i % 2 == 0 else ""
                      for i in range(h)], fontsize=7)
  ax.set_xlabel("input patch column")
  ax.set_ylabel("input patch row")
  ax.tick_params(length=0)
  for side in ax.spines.values():
    side.set_visible(False)
  fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04,
               label="cosine similarity")
  ax.set_title(title or "position embedding similarity", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
