"""Position embeddings: none, learned 1-D, learned 2-D, sincos 2-D, relative.

  python -m vit_jax.sweep --config=experiments/posemb/sweep.py \
      --workdir=/tmp/posemb

The ViT paper's Table 8 (ViT-B/16, ImageNet 5-shot linear): no position
information is clearly worse than any kind, and the kinds are close to each
other. Here `configs/canvas.py` (digits_canvas: digits at random positions
of a 32x32 canvas; width 64, depth 4, a 4x4 grid of 8x8 patches, 300 steps)
with `model.posemb` in none, learn (1-D table), learn2d (row and column
tables of D/2, concatenated), sincos2d (fixed) and relative (a learned bias
per relative offset and head, added to the attention logits of every
block), 3 seeds. Writes ROOT/results.md and ROOT/posemb.png.
"""

from vit_jax import sweep_plots

CONFIG = "configs/canvas.py"
KINDS = {
    "none": "none",
    "learn": "learned 1-D",
    "learn2d": "learned 2-D",
    "sincos2d": "sincos 2-D",
    "relative": "relative",
}


def report(rows, root):
  sweep_plots.bars(rows, ["eval/accuracy", "fewshot/canvas/10shot"],
                   f"{root}/posemb.png",
                   "digits_canvas: position embeddings",
                   labels=["test accuracy", "10-shot linear"])
  return "![](posemb.png)"


def get_sweep():
  settings = [dict(name=name, config=CONFIG, overrides={"model.posemb": kind})
              for kind, name in KINDS.items()]
  return dict(settings=settings, seeds=(0, 1, 2),
              metrics=["eval/accuracy", "fewshot/canvas/10shot"],
              report=report)
