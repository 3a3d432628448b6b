"""Fine-tuning recipe of the ViT paper: `vit.py:<variant>,<dataset>[,runlocal]`.

  python -m vit_jax.main --config=configs/vit.py:B/16,cifar10 \
      --config.init=ViT-B_16.npz --workdir=/tmp/ft_cifar10

SGD with momentum 0.9, batch 512, global-norm clipping at 1, no weight
decay, 500 warmup steps then cosine decay, resolution 384 (position
embeddings resampled from the checkpoint's grid with `scipy.ndimage.zoom`),
head re-initialised to zeros, steps per dataset as in the paper (ImageNet
20k, CIFAR 10k, Pets and Flowers 500). The paper sweeps the learning rate
over {0.001, 0.003, 0.01, 0.03}; the default is 0.03 (0.01 for ImageNet):
`--config.optim.lr=0.01`.

`config.init` takes a published-layout `.npz` or a training workdir.
`runlocal` shrinks everything to a CPU-sized smoke test (tiny images and
batches, a few steps); the dataset must still be prepared with tfds.
"""

import ml_collections

from vit_jax import config_utils

# dataset: (train split, eval split, total steps, learning rate)
DATASETS = {
    "cifar10": ("train[:98%]", "test", 10_000, 0.03),
    "cifar100": ("train[:98%]", "test", 10_000, 0.03),
    "imagenet2012": ("train[:99%]", "validation", 20_000, 0.01),
    "oxford_iiit_pet": ("train[:90%]", "test", 500, 0.03),
    "oxford_flowers102": ("train", "test", 500, 0.03),
}


def get_config(arg=None):
  """Fine-tuning config for `arg` = "<variant>,<dataset>[,runlocal]"."""
  args = config_utils.parse_arg(arg, ("variant", "dataset"))
  variant = args["variant"] or "B/16"
  dataset = args["dataset"] or "cifar10"
  config_utils.check_variant_and_dataset(
      variant, dataset, DATASETS, "configs/vit.py")
  train_split, eval_split, steps, lr = DATASETS[dataset]

  c = config_utils.default_config()
  c.dataset = dataset
  c.train_split = train_split
  c.eval_split = eval_split
  c.image_size = (384, 384)
  c.pp.inception_crop = True
  c.pp.crop_area = (0.05, 1.0)
  c.pp.flip = True
  c.batch_size = 512
  c.total_steps = steps

  c.model_name = variant
  c.model.update(config_utils.architecture(variant))
  c.model.classifier = "token"
  c.model.representation_size = None
  c.model.dropout_rate = 0.0

  c.optim.name = "sgd"
  c.optim.kwargs = ml_collections.ConfigDict(dict(momentum=0.9))
  c.optim.lr = lr
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 500 if steps > 1000 else 50
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  c.init_head = False        # Head always re-initialised to zeros.
  c.resample_posemb = True   # 224 -> 384: positions resampled (zoom).

  c.log_steps = 50
  c.evals.eval.every = 1000 if steps > 1000 else 100
  c.checkpoint_steps = 1000 if steps > 1000 else 100
  c.max_to_keep = 2

  if args["runlocal"]:
    config_utils.shrink_to_runlocal(c, variant, eval_split)
  return c
