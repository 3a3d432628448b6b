"""Mean attention distance per layer and head (the ViT paper's Figure 7, right).

For one head, the attention distance of a query patch q is the distance, in
pixels, that its attention spans on average:

    d(q) = sum_k a[q, k] * ||pos(q) - pos(k)||

where pos is the centre of a patch in pixels: patch (i, j) of the row-major
(h, w) grid sits at ((i + 0.5) * ph, (j + 0.5) * pw) for a patch (stride) of
(ph, pw) pixels, so grids and patches need not be square. The figure's value
for a (layer, head) is d(q) averaged over the query patches and the images.

Prefix tokens (the cls token) have no position in the image, so they are
dropped from the queries and from the keys, and each query's remaining row is
renormalised to sum to 1 over the patch keys: the distance is that of the
attention a query spends on patches. (Keeping the cls key with distance 0
would instead shrink the distance of heads that look at the cls token.) A row
with no mass on the patch keys at all contributes distance 0.
"""

import json

import jax.numpy as jnp
import numpy as np

from vit_jax.analysis import _plot
from vit_jax.sizes import pair

_TINY = 1e-30


def patch_centres(grid, patch_size):
  """Centres (y, x) in pixels of the patches of a grid, row-major: [h * w, 2]."""
  h, w = pair(grid, "grid")
  ph, pw = pair(patch_size, "patch_size")
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([(rows.reshape(-1) + 0.5) * ph,
                   (cols.reshape(-1) + 0.5) * pw], axis=-1).astype(np.float64)


def patch_distances(grid, patch_size):
  """Euclidean distances in pixels between patch centres: [h * w, h * w]."""
  c = patch_centres(grid, patch_size)
  return np.sqrt(((c[:, None, :] - c[None, :, :])**2).sum(-1))


def patch_attention(attention, num_patches, num_prefix_tokens=0):
  """Attention among patch tokens only, rows renormalised: [..., N, N].

  Args:
    attention: [..., T, T] attention weights (rows sum to 1), T = prefix + N.
    num_patches: N, the number of patch tokens.
    num_prefix_tokens: leading tokens without a position (1 for a cls token).
  """
  t = num_prefix_tokens + num_patches
  if attention.shape[-2:] != (t, t):
    raise ValueError(
        f"attention of shape {tuple(attention.shape)} does not cover "
        f"{num_prefix_tokens} prefix token(s) + {num_patches} patches: "
        f"expected [..., {t}, {t}]")
  a = attention[..., num_prefix_tokens:, num_prefix_tokens:]
  return a / jnp.maximum(a.sum(axis=-1, keepdims=True), _TINY)


def head_distances(attention, grid, patch_size, num_prefix_tokens=0):
  """Mean attention distance of each image and head of one layer.

  Args:
    attention: [B, H, T, T] weights of one layer (queries along axis 2).
    grid: patch grid (h, w) or int.
    patch_size: pixels per patch (grid spacing), (ph, pw) or int.
    num_prefix_tokens: leading tokens that are not patches (cls: 1).

  Returns:
    [B, H]: per image and head, the mean over query patches of
    sum_k a[q, k] * ||pos(q) - pos(k)|| in pixels (see the module doc).
    A jax array; works under `jax.jit`.
  """
  h, w = pair(grid, "grid")
  a = patch_attention(jnp.asarray(attention), h * w, num_prefix_tokens)
  d = jnp.asarray(patch_distances((h, w), patch_size), a.dtype)
  return jnp.einsum("...qk,qk->...q", a, d).mean(axis=-1)


def mean_attention_distance(attentions, grid, patch_size, num_prefix_tokens=0,
                            mask=None):
  """Mean attention distance per layer and head (Figure 7, right).

  Args:
    attentions: the layers' weights, a sequence of L arrays [B, H, T, T]
      (`out["block{i}/attention"]` of `model.apply(..., output_attentions=
      True)`) or one array [L, B, H, T, T].
    grid: patch grid (h, w) or int.
    patch_size: pixels per patch (for a hybrid: the encoder stride).
    num_prefix_tokens: `model.num_prefix_tokens` (1 with a cls token).
    mask: optional bool [B]; only images where it is True are averaged.

  Returns:
    numpy float64 [L, H]: distances in pixels averaged over query patches and
    images.
  """
  per_layer = jnp.stack([head_distances(a, grid, patch_size,
                                        num_prefix_tokens)
                         for a in attentions])  # [L, B, H]
  per_layer = np.asarray(per_layer, np.float64)
  if mask is None:
    return per_layer.mean(axis=1)
  mask = np.asarray(mask, bool)
  if not mask.any():
    raise ValueError("mask selects no image")
  return per_layer[:, mask].mean(axis=1)


def to_json(distances, path, **info):
  """Writes {"mean_attention_distance": [layers][heads], ...info} to `path`."""
  distances = np.asarray(distances, np.float64)
  record = {
      "mean_attention_distance": distances.tolist(),
      "num_layers": int(distances.shape[0]),
      "num_heads": int(distances.shape[1]),
      "units": "pixels",
  }
  record.update(info)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)


def plot(distances, path, title=""):
  """Scatter: x the layer (1-based), y the distance, one dot per head."""
  plt = _plot.pyplot()
  distances = np.asarray(distances, np.float64)
  num_layers, num_heads = distances.shape
  fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * num_layers + 3.0), 3.6))
  cmap = plt.get_cmap("tab20" if num_heads > 10 else "tab10")
  layers = np.arange(1, num_layers + 1)
  for head in range(num_heads):
    ax.scatter(layers, distances[:, head], s=14, color=cmap(head % cmap.N),
               label=f"head {head + 1}")
  ax.set_ylim(bottom=0, top=max(1e-6, 1.1 * float(distances.max())))
  ax.set_xticks(layers if num_layers <= 16 else layers[::2])
  ax.set_xlabel("network depth (layer)")
  ax.set_ylabel("mean attention distance (pixels)")
  if title:
    ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  if num_heads <= 16:
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              markerscale=0.8, frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
