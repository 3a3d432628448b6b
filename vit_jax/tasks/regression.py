"""Regression: float targets, one output, mean squared error.

The source's `label` is the target (a float; see `vit_jax.data` for sources
with float labels). The model has `num_classes=1` outputs and no
representation layer unless the config adds one. Its evaluator is
`regression` (MSE and MAE over the evaluation split).
"""

from vit_jax import losses


class Task:
  """MSE of the model's single output against float targets."""

  output = "values"
  default_evals = {"eval": dict(type="regression", every=500)}

  def __init__(self, config, source):
    del config, source
    self.model_fields = dict(num_classes=1)

  def loss(self, model, params, batch, rngs):
    output, _ = model.apply({"params": params}, batch["image"], train=True,
                            rngs={"dropout": rngs["dropout"]})
    return losses.mse(output, batch["label"]), {}
