"""Inductive bias and data size: ViT vs a BiT ResNet vs the hybrid.

  python -m vit_jax.sweep --config=experiments/data_size/sweep.py \
      --workdir=/tmp/data_size

The ViT paper's Figures 3 and 4: with little pre-training data the ResNet
(BiT) beats ViT; with more data ViT catches up and overtakes it; the hybrid
sits between, ahead on small data. Here the three families of
`configs/canvas.py:<family>` (ViT: a 4x4 grid of 8x8 patches, width 64,
depth 4; hybrid: a two-stage BiT stem whose /8 feature map is the same 4x4
grid, then the same encoder; BiT: a ResNet-v2 of three stages of two units,
width 16) train on 10%, 30% and 100% of the digits_canvas training split
(144, 431 and 1437 images; the same number of steps for each), 3 seeds each,
and are tested on the whole test split. Writes ROOT/results.md and
ROOT/data_size.png.
"""

from vit_jax import sweep_plots

FAMILIES = {"vit": "ViT", "bit": "BiT ResNet", "hybrid": "hybrid"}
FRACTIONS = (10, 30, 100)


def _name(family, percent):
  return f"{FAMILIES[family]} {percent}%"


def report(rows, root):
  percent_of = lambda s: float(s.rsplit(" ", 1)[1].rstrip("%"))
  family_of = lambda s: s.rsplit(" ", 1)[0]
  sweep_plots.lines(rows, percent_of, family_of, "eval/accuracy",
                    f"{root}/data_size.png",
                    "digits_canvas: accuracy vs training-set size",
                    "% of the training split", logx=True)
  return "![](data_size.png)"


def get_sweep():
  settings = []
  for family in FAMILIES:
    for percent in FRACTIONS:
      overrides = {}
      if percent < 100:
        overrides["train_split"] = f"train[:{percent}%]"
      settings.append(dict(name=_name(family, percent),
                           config=f"configs/canvas.py:{family}",
                           overrides=overrides))
  return dict(settings=settings, seeds=(0, 1, 2),
              metrics=["eval/accuracy", "fewshot/canvas/10shot"],
              report=report)
