"""Classification: integer labels, softmax (or sigmoid) cross-entropy.

Config: `loss` ("softmax_xent" or "sigmoid_xent"), `label_smoothing`;
`model.num_classes` defaults to the source's class count. A training source
with one class (e.g. an image folder with one class folder) is refused.
"""

import jax

from vit_jax import errors
from vit_jax import losses

LOSSES = ("softmax_xent", "sigmoid_xent")


class Task:
  """Cross-entropy of the model's logits against one-hot labels."""

  output = "logits"
  default_evals = {"eval": dict(type="classification", every=500)}

  def __init__(self, config, source):
    self.loss_name = config.get("loss") or "softmax_xent"
    if self.loss_name not in LOSSES:
      raise errors.Error(f"unknown loss {self.loss_name!r} for the "
                         f"classification task: use one of {', '.join(LOSSES)}"
                         " (or --config.task=regression for mse)")
    self.smoothing = float(config.get("label_smoothing") or 0.0)
    names = getattr(source, "class_names", None)
    if getattr(source, "num_classes", None) == 1:
      named = f" ({names[0]!r})" if names else ""
      raise errors.Error(
          f"dataset {config.get('dataset')!r} split "
          f"{config.get('train_split')!r} has one class{named}: "
          "classification needs at least two (every example would be right, "
          "with loss 0): add a folder per class")
    num_classes = config.model.get("num_classes")
    if num_classes is None:
      num_classes = getattr(source, "num_classes", None)
    if not num_classes:
      raise errors.Error("the dataset does not say how many classes it has: "
                         "set --config.model.num_classes")
    self.num_classes = int(num_classes)
    self.model_fields = dict(num_classes=self.num_classes)

  def targets(self, labels):
    onehot = jax.nn.one_hot(labels, self.num_classes)
    if self.smoothing:
      onehot = onehot * (1.0 - self.smoothing) + self.smoothing / self.num_classes
    return onehot

  def loss(self, model, params, batch, rngs):
    logits, _ = model.apply({"params": params}, batch["image"], train=True,
                            rngs={"dropout": rngs["dropout"]})
    loss = getattr(losses, self.loss_name)(logits, self.targets(batch["label"]))
    return loss, {}
