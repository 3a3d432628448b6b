"""Pre-training recipe of the ViT paper: `pretrain.py:<variant>,<dataset>`.

  python -m vit_jax.main --config=configs/pretrain.py:B/16,imagenet21k \
      --workdir=/tmp/pretrain

Adam (beta1=0.9, beta2=0.999), batch 4096, decoupled weight decay (multiplied
by the learning rate, as in the paper), 10k linear warmup steps then linear
decay, global-norm clipping at 1, a representation layer (tanh) of the width
of the model (768 / 1024 / 1280) before the head, resolution 224.
Per-dataset values follow the paper's Table 3:

- imagenet2012: 300 epochs, lr 3e-3, weight decay 0.3, dropout 0.1 (cosine
  decay for B, linear for L and H).
- imagenet21k: 90 epochs, lr 1e-3, weight decay 0.03, dropout 0.1 for B/L,
  sigmoid cross-entropy.
- others (small datasets, for study): 300 epochs, lr 1e-3 (8e-4 for L/H),
  weight decay 0.1, dropout 0.1.

`runlocal` shrinks everything to a CPU-sized smoke test.
"""

import ml_collections

from vit_jax import config_utils
from vit_jax import models

# dataset: (train split, eval split, train examples, epochs, lr, wd, loss)
DATASETS = {
    "imagenet2012": ("train[:99%]", "validation", 1_268_355, 300, 3e-3, 0.3,
                     "softmax_xent"),
    "imagenet21k": ("train[:99%]", "validation", 13_000_000, 90, 1e-3, 0.03,
                    "sigmoid_xent"),
    "cifar10": ("train[:98%]", "test", 49_000, 300, None, 0.1,
                "softmax_xent"),
    "cifar100": ("train[:98%]", "test", 49_000, 300, None, 0.1,
                 "softmax_xent"),
    "oxford_iiit_pet": ("train[:90%]", "test", 3_312, 300, None, 0.1,
                        "softmax_xent"),
    "oxford_flowers102": ("train", "test", 1_020, 300, None, 0.1,
                          "softmax_xent"),
}


def get_config(arg=None):
  """Pre-training config for `arg` = "<variant>,<dataset>[,runlocal]"."""
  args = config_utils.parse_arg(arg, ("variant", "dataset"))
  variant = args["variant"] or "B/16"
  dataset = args["dataset"] or "imagenet2012"
  config_utils.check_variant_and_dataset(
      variant, dataset, DATASETS, "configs/pretrain.py")
  train_split, eval_split, n_train, epochs, lr, wd, loss = DATASETS[dataset]
  size = variant.split("+")[-1].split("/")[0]  # "R50+B/16" -> "B".
  if lr is None:
    lr = 8e-4 if size in ("L", "H") else 1e-3
  width = models.get_config(variant)["hidden_size"]

  c = config_utils.default_config()
  c.dataset = dataset
  c.train_split = train_split
  c.eval_split = eval_split
  c.image_size = (224, 224)
  c.pp.inception_crop = True
  c.pp.crop_area = (0.05, 1.0)
  c.pp.flip = True
  c.batch_size = 4096
  steps = -(-epochs * n_train // c.batch_size)
  c.total_epochs = float(epochs)
  c.loss = loss

  c.model_name = variant
  c.model.update(config_utils.architecture(variant))
  c.model.classifier = "token"
  c.model.representation_size = width
  c.model.dropout_rate = 0.1 if size in ("B", "L") else 0.0

  c.optim.name = "adamw"
  c.optim.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
  c.optim.lr = lr
  c.optim.weight_decay = wd
  c.optim.schedule = ("cosine" if dataset == "imagenet2012" and size == "B"
                      else "linear")
  c.optim.warmup_steps = min(10_000, steps // 10)
  c.optim.clip_norm = 1.0

  c.log_steps = 100
  c.evals.eval.every = 5000
  c.checkpoint_steps = 2000
  c.max_to_keep = 2

  if args["runlocal"]:
    config_utils.shrink_to_runlocal(c, variant, eval_split)
    c.model.representation_size = 16
  return c
