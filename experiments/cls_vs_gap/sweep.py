"""Class token vs global average pooling, each over a learning-rate sweep.

  python -m vit_jax.sweep --config=experiments/cls_vs_gap/sweep.py \
      --workdir=/tmp/cls_vs_gap

The ViT paper's Figure 9: GAP works as well as the class token, but only
with a different learning rate. `configs/canvas.py` (digits_canvas, width 64,
depth 4, patch 8, AdamW, 300 steps), 5 learning rates x 2 poolings x 3 seeds.
Writes ROOT/results.md and ROOT/cls_vs_gap.png.
"""

from vit_jax import sweep as sweep_lib
from vit_jax import sweep_plots

CONFIG = "configs/canvas.py"
LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
POOLING = {"token": "class token", "gap": "GAP"}


def _name(pool, lr):
  return f"{POOLING[pool]} lr={lr:g}"


def report(rows, root):
  lr_of = lambda s: float(s.split("lr=")[1])
  pool_of = lambda s: s.split(" lr=")[0]
  sweep_plots.lines(rows, lr_of, pool_of, "eval/accuracy",
                    f"{root}/cls_vs_gap.png",
                    "digits_canvas: class token vs GAP", "learning rate",
                    logx=True)
  best = {}
  for setting, values in sweep_plots.by_setting(rows, "eval/accuracy").items():
    mean, std = sweep_lib.mean_std(values)
    pool = pool_of(setting)
    if pool not in best or mean > best[pool][1]:
      best[pool] = (lr_of(setting), mean, std)
  lines = ["Best learning rate per pooling (test accuracy):", ""]
  lines += [f"- {pool}: lr={lr:g}, {100 * m:.1f} ± {100 * s:.1f}%"
            for pool, (lr, m, s) in best.items()]
  return "\n".join(lines) + "\n\n![](cls_vs_gap.png)"


def get_sweep():
  settings = [dict(name=_name(pool, lr), config=CONFIG,
                   overrides={"model.classifier": pool, "optim.lr": lr})
              for pool in POOLING for lr in LRS]
  return dict(settings=settings, seeds=(0, 1, 2),
              metrics=["eval/accuracy", "fewshot/canvas/10shot"],
              report=report)
