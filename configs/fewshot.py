"""Few-shot linear evaluation configs (for `python -m vit_jax.fewshot`).

  python -m vit_jax.fewshot --workdir=/tmp/digits_run \
      --config=configs/fewshot.py
  python -m vit_jax.fewshot --workdir=/tmp/digits_run \
      --config=configs/fewshot.py:digits,pixels
  python -m vit_jax.fewshot --workdir=/tmp/b16 --init=ViT-B_16.npz \
      --model=B/16 --config=configs/fewshot.py:paper

`arg` is "<preset>[,<representation>]":
- preset "digits" (default): the bundled 8x8 digits, train split as the
  few-shot pool, test split for evaluation; runs anywhere.
- preset "paper": the transfer sets of the ViT paper's few-shot numbers, read
  with tfds from `--config.data_dir` (they must be prepared there; building
  them needs TensorFlow). Images at the model's resolution.
- representation: "pre_logits" (default), any key of the model's `out` dict
  (e.g. "encoded", "block3" flattened), or "pixels" (raw flattened pixels, no
  model; at the source's own size unless `image_size` is set): the floor.

Every field can be overridden, e.g. `--config.shots="(1, 5)"`,
`--config.l2_regs="(1., 1024.)"`, `--config.seeds="(0,)"`.
"""

import ml_collections

from vit_jax import config_utils
from vit_jax import errors
from vit_jax.evaluators import fewshot

# name -> (tfds name, few-shot pool split, evaluation split)
PAPER_DATASETS = {
    "cifar100": ("tfds:cifar100", "train", "test"),
    "cifar10": ("tfds:cifar10", "train", "test"),
    "pets": ("tfds:oxford_iiit_pet", "train", "test"),
    "flowers": ("tfds:oxford_flowers102", "train", "test"),
    "caltech": ("tfds:caltech101", "train", "test"),
    "dtd": ("tfds:dtd", "train", "test"),
    "birds": ("tfds:caltech_birds2011", "train", "test"),
    "cars": ("tfds:cars196", "train", "test"),
    "imagenet": ("tfds:imagenet2012", "train", "validation"),
}

PRESETS = {
    "digits": (("digits", "digits", "train", "test"),),
    "paper": tuple((name,) + spec for name, spec in PAPER_DATASETS.items()),
}


def get_config(arg=None):
  """Few-shot config; `arg` is "<preset>[,<representation>]"."""
  args = config_utils.parse_arg(arg, ("preset", "representation"))
  preset = args["preset"] or "digits"
  if preset not in PRESETS:
    raise errors.Error(
        f"unknown few-shot preset {preset!r}: use one of {sorted(PRESETS)}")
  c = fewshot.default_config()
  c.datasets = PRESETS[preset]
  c.representation = args["representation"] or "pre_logits"
  c.shots = (1, 5, 10, 25)
  c.seeds = (0, 1, 2, 3, 4)
  c.image_size = ml_collections.config_dict.placeholder(tuple)
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.num_channels = ml_collections.config_dict.placeholder(int)
  if preset == "digits":
    c.batch_size = 360
  if args["runlocal"]:
    c.shots = (1, 5)
    c.seeds = (0, 1)
  return c
