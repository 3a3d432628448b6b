"""Attention rollout (Abnar & Zuidema 2020), as used for the ViT paper's Figure 6.

Per layer l, the heads' weights are averaged, the identity is added for the
residual connection and the rows are renormalised:

    R_l = (mean_h A_l,h + I) / rowsum

and the layers are multiplied through, the first layer acting first:

    rollout = R_L @ ... @ R_2 @ R_1    ([B, T, T], rows sum to 1).

Row q of the rollout says how much of token q's output flows from each input
token. The map of an image is the cls token's row over the patch tokens
(`num_prefix_tokens` >= 1); for models without a cls token (gap, map
pooling) it is the mean of the rows of the patch tokens. It is reshaped to
the patch grid and, for display, upsampled to the image.
"""

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.analysis import _plot
from vit_jax.sizes import pair


def rollout(attentions):
  """Attention rollout of a stack of layers: [B, T, T].

  Args:
    attentions: a sequence of L arrays [B, H, T, T] (the layers' weights, the
      first layer first), or one array [L, B, H, T, T].

  Returns:
    A jax array [B, T, T] whose rows sum to 1; works under `jax.jit`.
  """
  joint = None
  for a in attentions:
    a = jnp.asarray(a)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
      raise ValueError(f"attention weights must be [batch, heads, tokens, "
                       f"tokens], got shape {tuple(a.shape)}")
    a = a.mean(axis=1) + jnp.eye(a.shape[-1], dtype=a.dtype)
    a = a / a.sum(axis=-1, keepdims=True)
    joint = a if joint is None else jnp.einsum("bij,bjk->bik", a, joint)
  if joint is None:
    raise ValueError("rollout needs at least one layer of attention weights")
  return joint


def rollout_map(attentions, grid, num_prefix_tokens=1):
  """Rollout map of each image over the patch grid: [B, h, w].

  Args:
    attentions: as for `rollout`.
    grid: patch grid (h, w) or int.
    num_prefix_tokens: `model.num_prefix_tokens`; with a prefix the map is the
      row of token 0 (cls) over the patches, without one the mean of the
      patch rows.

  Returns:
    A jax array [B, h, w] (not normalised: the cls row's mass on the patches,
    which with a cls token sums to less than 1).
  """
  h, w = pair(grid, "grid")
  joint = rollout(attentions)
  t = num_prefix_tokens + h * w
  if joint.shape[-1] != t:
    raise ValueError(f"attention over {joint.shape[-1]} tokens does not match "
                     f"{num_prefix_tokens} prefix token(s) + {h}x{w} patches")
  if num_prefix_tokens:
    row = joint[:, 0, num_prefix_tokens:]
  else:
    row = joint.mean(axis=1)
  return row.reshape(row.shape[0], h, w)


def upsample(maps, image_size, method="bilinear"):
  """[B, h, w] maps -> [B, H, W] with `jax.image.resize`."""
  height, width = pair(image_size, "image_size")
  maps = jnp.asarray(maps)
  return jax.image.resize(maps, (maps.shape[0], height, width), method)


def plot(images, maps, path, title=""):
  """Each image above its rollout map overlaid (jet, each map min-max scaled).

  Args:
    images: [B, H, W, C] in [-1, 1].
    maps: [B, h, w] rollout maps (upsampled here to the images' size).
    path: PNG to write.
    title: figure title.
  """
  plt = _plot.pyplot()
  images = np.asarray(images, np.float32)
  n = images.shape[0]
  big = np.asarray(upsample(maps, images.shape[1:3]), np.float32)
  lo = big.min(axis=(1, 2), keepdims=True)
  big = (big - lo) / np.maximum(big.max(axis=(1, 2), keepdims=True) - lo,
                                1e-30)
  fig, axes = plt.subplots(2, n, figsize=(1.8 * n + 0.4, 3.9), squeeze=False)
  for i in range(n):
    shown, cmap = _plot.to_display(images[i])
    axes[0, i].imshow(shown, cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
    axes[1, i].imshow(shown, cmap=cmap, vmin=0, vmax=1,
                      interpolation="nearest")
    axes[1, i].imshow(big[i], cmap="jet", alpha=0.5, vmin=0, vmax=1,
                      interpolation="bilinear")
    for ax in axes[:, i]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel("input", fontsize=8)
  axes[1, 0].set_ylabel("attention rollout", fontsize=8)
  fig.suptitle(title or "attention rollout", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
