"""Classification accuracy and loss over a whole evaluation split."""

import jax.numpy as jnp
import optax

from vit_jax.evaluators import common

READS = "logits"  # The task output it reads (see vit_jax.tasks).


class Evaluator(common.SplitEvaluator):
  """Top-1 accuracy and mean cross-entropy of a split.

  `run` returns {"accuracy", "loss", "num_correct", "num_examples"}.
  """

  def per_example(self, params, batch):
    logits, _ = self.predict_fn(params, batch["image"])
    logits = logits.astype(jnp.float32)
    labels = batch["label"]
    return {"correct": jnp.argmax(logits, -1) == labels,
            "nll": optax.softmax_cross_entropy_with_integer_labels(
                logits, labels)}

  def run(self, params, step=None):
    del step
    s = self.sums.run(params)
    count = max(s["count"], 1.0)
    return {"accuracy": s["correct"] / count, "loss": s["nll"] / count,
            "num_correct": s["correct"], "num_examples": s["count"]}
