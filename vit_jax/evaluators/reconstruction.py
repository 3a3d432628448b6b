"""Masked-image-modeling reconstruction: masked L1 beside a trivial baseline.

For every example of the split, a SimMIM block mask (fixed per example:
`fold_in(PRNGKey(seed), index)`, the same at every evaluation) hides
`mask_ratio` of the image in cells of `mask_unit` pixels; the model
reconstructs the image and the L1 error on the masked pixels is averaged as
Hugging Face's loss does (`losses.masked_l1`, summed over the split). The
baseline predicts every masked pixel by the per-pixel mean image of the
training split (at most `baseline_examples` of it).

`run(params, step)` returns {"masked_l1", "baseline_l1", "ratio_to_baseline",
"num_examples"} and, with a workdir, writes
`<workdir>/reconstructions_<step>.png`: for the first `num_images` examples,
original | masked input | reconstruction | reconstruction pasted into the
visible pixels.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import data
from vit_jax import losses
from vit_jax import masking
from vit_jax import sharding
from vit_jax.evaluators import common

READS = "reconstruction"  # The task output it reads (see vit_jax.tasks).


def _to_uint8(images):
  return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0,
                 255).astype(np.uint8)


def save_grid(path, columns, titles):
  """A PNG of images [N, H, W, C] in [-1, 1] side by side per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = len(columns[0])
  fig, axes = plt.subplots(rows, len(columns), squeeze=False,
                           figsize=(1.6 * len(columns), 1.6 * rows))
  for j, (images, title) in enumerate(zip(columns, titles)):
    for i in range(rows):
      image = _to_uint8(images[i])
      ax = axes[i][j]
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
      else:
        ax.imshow(image[..., :3])
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


class Evaluator:
  """Masked L1 of the reconstruction and of the mean-image baseline."""

  def __init__(self, predict_fn, mesh, *, dataset, split, batch_size,
               image_size, train_split="train", num_channels=None,
               data_dir=None, mask_ratio=0.6, mask_unit=32, seed=0,
               workdir=None, num_images=8, baseline_examples=2048,
               strict_images=False):
    self.predict_fn = predict_fn
    self.mesh = mesh
    self.source = common.load_source(dataset, split, data_dir, strict_images)
    self.skipped = common.skipped_files(self.source, f"{dataset} {split}")
    self.train_source = common.load_source(dataset, train_split, data_dir,
                                           strict_images)
    self.batch_size = int(batch_size)
    self.image_size = tuple(image_size)
    self.num_channels = num_channels
    self.ratio = float(mask_ratio)
    masking.num_masked(1, self.ratio)  # Validates the ratio.
    self.mask_unit = int(mask_unit)
    self.rng = jax.random.PRNGKey(int(seed))
    self.workdir = workdir
    self.num_images = int(num_images)
    self.baseline_examples = int(baseline_examples)
    self._mean_image = None
    self._sums = None
    self._stride_px = None
    self._predict = jax.jit(predict_fn)

  def _stride(self, params):
    """Pixels per patch, from the shape of the model's patch grid."""
    if self._stride_px is None:
      dummy = jnp.zeros((1, *self.image_size, self._channels()), jnp.float32)
      stem = jax.eval_shape(lambda p: self.predict_fn(p, dummy)[1]["stem"],
                            params)
      h, w = self.image_size
      self._stride_px = (h // stem.shape[1], w // stem.shape[2])
    return self._stride_px

  def _channels(self):
    if self.num_channels:
      return int(self.num_channels)
    return int(np.asarray(self.source[0]["image"]).shape[-1])

  def mean_image(self):
    """Per-pixel mean of (at most `baseline_examples` of) the train split."""
    if self._mean_image is None:
      n = len(self.train_source)
      keep = np.linspace(0, n - 1, min(n, self.baseline_examples)).astype(int)
      subset = common.Subset(self.train_source, np.unique(keep))
      total, count = 0.0, 0
      for batch in data.eval_batches(subset, min(256, len(subset)),
                                     self.image_size,
                                     num_channels=self.num_channels):
        m = batch["mask"]
        total = total + batch["image"][m].astype(np.float64).sum(0)
        count += int(m.sum())
      self._mean_image = (total / max(count, 1)).astype(np.float32)
    return self._mean_image

  def masks(self, params, indices):
    """The fixed masks of examples `indices` of the split."""
    sh, sw = self._stride(params)
    if sh != sw or self.mask_unit % sh:
      raise ValueError(f"mask_unit={self.mask_unit} px is not a multiple of "
                       f"the patch size {(sh, sw)}")
    grid = (self.image_size[0] // sh, self.image_size[1] // sw)
    return masking.example_masks(self.rng, indices, grid, self.ratio,
                                 self.mask_unit // sh), (sh, sw)

  def pixel_mask(self, mask, stride):
    """[B, h * w] patch mask -> [B, H, W, 1] float pixel mask."""
    grid = (self.image_size[0] // stride[0], self.image_size[1] // stride[1])
    return losses.upsample_mask(mask, grid, stride)[..., None]

  def _build(self, params):
    mean = jnp.asarray(self.mean_image())

    def per_example(params, batch):
      images = batch["image"]
      mask, stride = self.masks(params, batch["index"])
      recon, _ = self.predict_fn(params, images, bool_masked_pos=mask)
      b = images.shape[0]
      pix = self.pixel_mask(mask, stride)
      err = jnp.abs(images - recon.astype(jnp.float32)) * pix
      base = jnp.abs(images - mean[None]) * pix
      return {"abs": err.reshape(b, -1).sum(-1),
              "base": base.reshape(b, -1).sum(-1),
              "masked": pix.reshape(b, -1).sum(-1)}

    return common.SplitSums(per_example, self.mesh, self.source,
                            self.batch_size, self.image_size,
                            self.num_channels)

  def run(self, params, step=None):
    if self._sums is None:
      self._sums = self._build(params)
    s = self._sums.run(params)
    channels = self._channels()
    masked = max(s["masked"], 1.0) * channels
    out = {"masked_l1": s["abs"] / masked, "baseline_l1": s["base"] / masked,
           "num_examples": s["count"]}
    out["ratio_to_baseline"] = out["masked_l1"] / max(out["baseline_l1"],
                                                      1e-12)
    if self.workdir:  # Every process runs the model; process 0 writes.
      self.save_png(params, step)
    return out

  def reconstructions(self, params):
    """(images, masked input, reconstruction, pasted) of the first examples."""
    n = min(self.num_images, len(self.source))
    subset = common.Subset(self.source, np.arange(n))
    batch = next(iter(data.eval_batches(subset, n, self.image_size,
                                        num_channels=self.num_channels)))
    images = batch["image"]
    mask, stride = self.masks(params, np.arange(n, dtype=np.int32))
    params = jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)
    recon, _ = self._predict(params, jnp.asarray(images),
                             bool_masked_pos=mask)
    recon = np.asarray(sharding.to_numpy(recon), np.float32)
    pix = np.asarray(self.pixel_mask(mask, stride)) > 0
    masked_input = np.where(pix, 0.0, images)
    pasted = np.where(pix, recon, images)
    return images, masked_input, recon, pasted

  def save_png(self, params, step):
    columns = self.reconstructions(params)
    if jax.process_index():
      return
    name = f"reconstructions_{'final' if step is None else int(step)}.png"
    save_grid(os.path.join(self.workdir, name), columns,
              ("original", "masked input", "reconstruction", "pasted"))
