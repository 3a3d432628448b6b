"""Classification accuracy and loss over a whole evaluation split.

Every example is counted exactly once: the data layer pads the last batch and
marks padding with `mask=False`. Counts are computed on global arrays under
`jax.jit`, so no explicit cross-device reduction is needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import data
from vit_jax import sharding


class ClassificationEvaluator:
  """Top-1 accuracy and mean cross-entropy of a split."""

  def __init__(self, model, mesh, source, *, batch_size, image_size,
               num_channels=None, prefix="eval/"):
    self.model = model
    self.mesh = mesh
    self.source = source
    self.batch_size = batch_size
    self.image_size = tuple(image_size)
    self.num_channels = num_channels
    self.prefix = prefix
    self._step = jax.jit(self._counts)

  def _counts(self, params, images, labels, mask):
    logits, _ = self.model.apply({"params": params}, images, train=False)
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return correct.sum(), (nll * mask).sum(), mask.sum()

  def _batches(self):
    kwargs = dict(global_batch_size=self.batch_size,
                  image_size=self.image_size,
                  process_index=jax.process_index(),
                  process_count=jax.process_count())
    if self.num_channels is not None:
      kwargs["num_channels"] = self.num_channels
    return data.eval_batches(self.source, **kwargs)

  def run(self, params):
    """Returns {"<prefix>accuracy", "<prefix>loss", "<prefix>num_correct",
    "<prefix>num_examples"} for the whole split."""
    totals = None
    for batch in self._batches():
      b = sharding.to_global(
          {k: batch[k] for k in ("image", "label", "mask")}, self.mesh)
      counts = self._step(params, b["image"], b["label"], b["mask"])
      totals = counts if totals is None else jax.tree.map(
          jnp.add, totals, counts)
    correct, loss, count = (float(np.asarray(x)) for x in totals)
    count = max(count, 1.0)
    p = self.prefix
    return {f"{p}accuracy": correct / count, f"{p}loss": loss / count,
            f"{p}num_correct": correct, f"{p}num_examples": count}


def from_config(config, model, mesh):
  """The evaluator for `config.eval_split` of `config.dataset`."""
  from vit_jax import config_utils  # pylint: disable=g-import-not-at-top
  source = data.get_source(config.dataset, config.eval_split,
                           data_dir=config.get("data_dir"))
  batch_size = config.get("eval_batch_size") or config.batch_size
  return ClassificationEvaluator(
      model, mesh, source, batch_size=batch_size,
      image_size=config_utils.as_tuple2(config.image_size),
      num_channels=config.get("num_channels"))
