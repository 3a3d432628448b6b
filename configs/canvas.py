"""The studies' base: a small ViT on `digits_canvas`, on a CPU.

  python -m vit_jax.main --config=configs/canvas.py --workdir=/tmp/canvas

`digits_canvas` draws each 8x8 digit at twice its size (16x16) at a random
but fixed position of a black 32x32 canvas (1437 training, 360 test images),
so that where a patch sits matters. The model sees the 32x32 canvas in
patches of 8 (a 4x4 grid), width 64, depth 4, 4 heads; AdamW with a cosine
schedule, batch 128, 300 steps (52 s on two CPU cores, 62% test accuracy:
short enough for sweeps of many seeds, and still under-fitted), random crops
covering at least half of the canvas (resized back to 32x32: they move and
scale the digit), no flips. The experiments in
`experiments/` sweep this config's fields (position embeddings, pooling,
learning rate, model family, data fraction, resolution).

At the end of training it reports test accuracy (`eval/accuracy`) and the
10-shot linear accuracy of the frozen pooled representation
(`fewshot/canvas/10shot`), the paper's cheap metric.

`canvas.py:<family>` picks the model, all with 16 tokens of width 64 where
they have tokens: `vit` (the default), `hybrid` (a two-stage BiT stem of
width 32 whose /8 feature map is the 4x4 grid of 1x1 patches, then the same
encoder) and `bit` (a BiT ResNet-v2 of three stages of two units, width 16).
`canvas.py:runlocal` is a few-step smoke test.
"""

import ml_collections

from vit_jax import config_utils
from vit_jax.errors import Error

ENCODER = dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
               classifier="token", posemb="learn")
FAMILIES = {
    # family: (model_name, config.model fields)
    "vit": ("testing", dict(ENCODER, patch_size=8)),
    "hybrid": ("R26+S/32", dict(
        ENCODER, patch_size=1,
        resnet=dict(num_layers=(1, 1), width_factor=0.5))),
    "bit": ("BiT-R26x1", dict(
        resnet=dict(num_layers=(2, 2, 2), width_factor=0.25))),
}


def get_config(arg=None):
  """Canvas config; `arg` is "[family][,runlocal]"."""
  args = config_utils.parse_arg(arg, ("family",))
  family = args["family"] or "vit"
  if family not in FAMILIES:
    raise Error(f"unknown model family {family!r}: use one of "
                f"{', '.join(FAMILIES)} (configs/canvas.py:<family>)")
  c = config_utils.default_config()
  c.dataset = "digits_canvas"
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = (32, 32)
  c.pp.inception_crop = True
  c.pp.crop_area = (0.5, 1.0)
  c.pp.flip = False
  c.pp.worker_count = 0
  c.batch_size = 128
  c.eval_batch_size = 360
  c.total_steps = 300

  c.model_name, fields = FAMILIES[family]
  c.model.update(fields)

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.05
  c.optim.clip_norm = 1.0
  c.label_smoothing = 0.1

  c.log_steps = 100
  c.evals.eval.every = 0
  c.checkpoint_steps = 300
  c.max_to_keep = 1

  c.evals.fewshot = ml_collections.ConfigDict(dict(
      type="fewshot", every=0,
      datasets=(("canvas", "digits_canvas", "train", "test"),),
      shots=(10,),
      seeds=(0, 1, 2),
      representation="pre_logits",
      batch_size=360,
      l2_regs=config_utils.FEWSHOT_L2_GRID,  # Leave-one-out searches it.
  ))

  if args["runlocal"]:
    c.total_steps = 10
    c.log_steps = 5
    c.checkpoint_steps = 10
    if family != "bit":
      c.model.num_layers = 1
    c.optim.warmup_steps = 2
    c.evals.fewshot.seeds = (0,)
    c.batch_size = 32
    c.eval_split = "test[:64]"
    c.eval_batch_size = 64
    c.evals.fewshot.batch_size = 64
    c.evals.fewshot.datasets = (
        ("canvas", "digits_canvas", "train[:20%]", "test[:64]"),)
  return c
