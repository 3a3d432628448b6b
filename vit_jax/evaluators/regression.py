"""Regression error over a whole evaluation split: MSE and MAE."""

import jax.numpy as jnp

from vit_jax.evaluators import common

READS = "values"  # The task output it reads (see vit_jax.tasks).


class Evaluator(common.SplitEvaluator):
  """Mean squared and absolute error of the model's single output.

  `run` returns {"mse", "mae", "num_examples"}.
  """

  def per_example(self, params, batch):
    output, _ = self.predict_fn(params, batch["image"])
    err = output.reshape(output.shape[0], -1)[:, 0] - batch["label"]
    return {"se": jnp.square(err), "ae": jnp.abs(err)}

  def run(self, params, step=None):
    del step
    s = self.sums.run(params)
    count = max(s["count"], 1.0)
    return {"mse": s["se"] / count, "mae": s["ae"] / count,
            "num_examples": s["count"]}
