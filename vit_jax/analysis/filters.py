"""Principal components of the patch-embedding filters (the ViT paper's Figure 7, left).

The patch embedding is a convolution with kernel (ph, pw, C, D): D filters,
each a ph * pw * C vector. Its principal components are those of the D
filters as samples: the filters are centred (the mean filter subtracted) and
the components are the left singular vectors of the centred [ph * pw * C, D]
matrix, ordered by the variance they explain. Each component is shown as a
ph x pw image (RGB for C = 3). The sign of a component is arbitrary; it is
fixed here so that its entry of largest magnitude is positive.
"""

import numpy as np

from vit_jax.analysis import _plot


def principal_components(kernel, k=None, center=True):
  """Top-k principal components of the filters of a patch-embedding kernel.

  Args:
    kernel: (ph, pw, C, D) convolution kernel (`params["embedding"]
      ["kernel"]`).
    k: number of components (default all: min(ph * pw * C, D), or
      min(ph * pw * C, D - 1) when centred); clipped to that number.
    center: subtract the mean filter first (standard PCA).

  Returns:
    (components, explained): numpy float64 [k, ph, pw, C] unit-norm
    components and [k] the fraction of the total variance each explains.
  """
  kernel = np.asarray(kernel, np.float64)
  if kernel.ndim != 4:
    raise ValueError(f"patch-embedding kernel must be (ph, pw, C, D), got "
                     f"shape {kernel.shape}")
  ph, pw, c, d = kernel.shape
  x = kernel.reshape(ph * pw * c, d)
  if center:
    x = x - x.mean(axis=1, keepdims=True)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  var = s**2
  explained = var / max(var.sum(), 1e-300)
  # Centred, the D filters span at most D - 1 directions.
  rank = min(u.shape[1], d - 1) if center and d > 1 else u.shape[1]
  k = rank if k is None else max(1, min(int(k), rank))
  u = u[:, :k]
  signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
  u = u * np.where(signs == 0, 1., signs)
  return u.T.reshape(k, ph, pw, c), explained[:k]


def _component_image(component):
  """[ph, pw, C] -> (image in [0, 1], cmap): RGB for 3 channels, grey for 1,
  the channels side by side otherwise."""
  lo, hi = component.min(), component.max()
  image = (component - lo) / max(hi - lo, 1e-30)
  c = image.shape[-1]
  if c == 3:
    return image, None
  if c == 1:
    return image[..., 0], "gray"
  gap = np.full((image.shape[0], 1), np.nan)
  parts = []
  for i in range(c):
    parts += [image[..., i], gap] if i < c - 1 else [image[..., i]]
  return np.concatenate(parts, axis=1), "gray"


def plot(components, path, explained=None, title="", ncols=7):
  """Grid of the components, each as a ph x pw (x C) image."""
  plt = _plot.pyplot()
  components = np.asarray(components)
  k = components.shape[0]
  ncols = max(1, min(ncols, k))
  nrows = -(-k // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(1.2 * ncols + 0.2,
                                                  1.3 * nrows + 0.5),
                           squeeze=False)
  for i, ax in enumerate(axes.reshape(-1)):
    ax.set_xticks([])
    ax.set_yticks([])
    if i >= k:
      ax.axis("off")
      continue
    image, cmap = _component_image(components[i])
    ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    label = f"{i + 1}"
    if explained is not None:
      label += f": {100 * float(explained[i]):.1f}%"
    ax.set_title(label, fontsize=7)
  fig.suptitle(title or "patch-embedding filters: principal components",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
