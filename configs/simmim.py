"""SimMIM masked-image-modeling pre-training: `simmim.py:<variant>,<dataset>`.

  python -m vit_jax.main --config=configs/simmim.py:digits --workdir=/tmp/mim
  python -m vit_jax.main --config=configs/simmim.py:B/16,imagenet2012 \
      --workdir=/tmp/simmim_b16

The recipe of SimMIM (Xie et al. 2022) for ViT-B: 224 px, random block masks
of 32 px (2x2 patches of 16 px) covering 60% of the image, the mask token and
a linear decoder (1x1 conv + pixel shuffle) reconstructing the raw pixels
with an L1 loss on the masked pixels; AdamW (0.9, 0.999), weight decay 0.05,
base learning rate 1e-4 per 512 images (scaled linearly with the batch),
batch 2048, 10 warmup epochs then cosine decay to 5e-6 x batch / 512, 800
epochs, gradient clipping at 5, random resized crops (67%-100% area) and
flips. The representation is evaluated by reconstruction (masked L1 against
the mean-image baseline, PNGs in the workdir) and few-shot accuracy of the
frozen encoder's mean-pooled patch tokens (`patch_mean`).

`simmim.py:digits` is the CPU preset: the digits model of `configs/digits.py`
(so that `configs/digits.py --config.init=/tmp/mim` fine-tunes it), 16 px
images of 4 px patches, masks of single patches (the image is only 4 patches
wide: 8 px cells would leave 2x2 cells, each half of a digit), ratio 0.6,
AdamW at 2e-3 for 1500 steps of 128 and no random crops: on 8x8 digits
upsampled to 16 px, random resized crops change the digits' scale so much
that the reconstruction of the (uncropped) test images suffered (masked L1
0.76x the baseline after 1500 steps with crops at lr 1e-3; 0.46x without
crops at 2e-3).
Fine-tune a MIM checkpoint for classification with `--config.init=DIR`; the
decoder and mask token are dropped, and `--config.optim.layer_decay=0.75`
gives SimMIM's layer-wise learning-rate decay.
"""

import importlib.util
import os

import ml_collections

from vit_jax import config_utils

# dataset: (train split, eval split, epochs, image size)
DATASETS = {
    "imagenet2012": ("train", "validation", 800, 224),
    "cifar10": ("train", "test", 800, 32),
    "digits": ("train", "test", None, 16),
}


def get_config(arg=None):
  """`arg` = "digits[,runlocal]" or "<variant>,<dataset>[,runlocal]"."""
  args = config_utils.parse_arg(arg, ("variant", "dataset"))
  if args["variant"] == "digits" and args["dataset"] is None:
    return _digits(args["runlocal"])
  variant = args["variant"] or "B/16"
  dataset = args["dataset"] or "imagenet2012"
  config_utils.check_variant_and_dataset(variant, dataset, DATASETS,
                                         "configs/simmim.py")
  train_split, eval_split, epochs, size = DATASETS[dataset]

  c = config_utils.default_config()
  c.task = "simmim"
  c.simmim = ml_collections.ConfigDict(dict(mask_ratio=0.6, mask_unit=32))
  c.dataset = dataset
  c.train_split = train_split
  c.eval_split = eval_split
  c.image_size = (size, size)
  c.pp.inception_crop = True
  c.pp.crop_area = (0.67, 1.0)
  c.pp.flip = True
  c.batch_size = 2048
  c.total_epochs = float(epochs)

  c.model_name = variant
  c.model.update(config_utils.architecture(variant))
  c.model.classifier = "token"  # HF's ViTForMaskedImageModeling layout.
  c.model.stochastic_depth = 0.1

  _simmim_optimizer(c, base_lr=1e-4, warmup_epochs=10, epochs=epochs,
                    train_examples=1_281_167 if dataset == "imagenet2012"
                    else 50_000)

  c.log_steps = 100
  c.checkpoint_steps = 2000
  c.max_to_keep = 2
  c.evals = ml_collections.ConfigDict(dict(
      reconstruction=dict(type="reconstruction", every=5000, mask_ratio=0.6,
                          mask_unit=32)))
  if args["runlocal"]:
    config_utils.shrink_to_runlocal(c, variant, eval_split)
    c.image_size = (64, 64)  # Mask cells of 32 px.
  return c


def _simmim_optimizer(c, base_lr, warmup_epochs, epochs, train_examples):
  """AdamW, wd 0.05, lr scaled by batch / 512, warmup + cosine, clip 5."""
  scale = c.batch_size / 512
  steps_per_epoch = max(1, train_examples // c.batch_size)
  c.optim.name = "adamw"
  c.optim.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
  c.optim.lr = base_lr * scale
  c.optim.end_lr = 5e-6 * scale
  c.optim.weight_decay = 0.05
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = int(warmup_epochs * steps_per_epoch)
  c.optim.clip_norm = 5.0
  del epochs


def _digits(runlocal):
  """The CPU preset: configs/digits.py's model and data, SimMIM's task."""
  c = _load_sibling("digits").get_config("runlocal" if runlocal else None)
  c.task = "simmim"
  c.simmim = ml_collections.ConfigDict(dict(mask_ratio=0.6, mask_unit=4))
  c.pp.inception_crop = False  # The masks are the augmentation (see above).
  c.total_steps = 10 if runlocal else 1500
  c.label_smoothing = 0.0

  c.optim.kwargs = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
  c.optim.lr = 2e-3
  c.optim.end_lr = 1e-5
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 2 if runlocal else 100
  c.optim.clip_norm = 5.0

  c.checkpoint_steps = 5 if runlocal else 500
  fewshot = c.evals.fewshot
  fewshot.representation = "patch_mean"  # No head or pre_logits.
  c.evals = ml_collections.ConfigDict(dict(
      reconstruction=dict(type="reconstruction", every=5 if runlocal else 500,
                          mask_ratio=0.6, mask_unit=4),
      fewshot=fewshot))
  return c


def _load_sibling(name):
  """Another config file of this folder, as a module."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
