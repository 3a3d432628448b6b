"""Fine-tuning at a higher resolution, position embeddings resampled or not.

  python -m vit_jax.sweep --config=experiments/hires_finetune/sweep.py \
      --workdir=/tmp/hires_finetune

The ViT paper fine-tunes at a higher resolution than it pre-trains at: the
patch size stays, so the grid grows, and the learned position embeddings
are resampled by 2-D interpolation to the new grid. Here `configs/canvas.py`
is pre-trained at 32x32 (a 4x4 grid of 8x8 patches, 300 steps), then
fine-tuned for 200 steps (AdamW, lr 5e-4, cosine, the head kept):

- at the training size (32x32),
- at 48x48 (a 6x6 grid) with the embeddings resampled (bilinear),
- at 48x48 with fresh embeddings (the pre-trained ones dropped).

3 seeds; each fine-tuning point starts from the same seed's pre-training
point, which the sweep runs first. Writes ROOT/results.md and
ROOT/hires_finetune.png.
"""

from vit_jax import sweep_plots

CONFIG = "configs/canvas.py"
PRETRAIN = "pre-train 32"
FINETUNE = {"total_steps": 200, "optim.lr": 5e-4, "optim.warmup_steps": 20,
            "init": "{root}/pre-train_32_s{seed}"}


def report(rows, root):
  sweep_plots.bars(rows, ["eval/accuracy", "fewshot/canvas/10shot"],
                   f"{root}/hires_finetune.png",
                   "digits_canvas: fine-tuning at 48x48 after 32x32",
                   labels=["test accuracy", "10-shot linear"])
  return "![](hires_finetune.png)"


def get_sweep():
  settings = [
      dict(name=PRETRAIN, config=CONFIG, overrides={}),
      dict(name="fine-tune 32", config=CONFIG, overrides=dict(FINETUNE)),
      dict(name="fine-tune 48, resampled", config=CONFIG,
           overrides=dict(FINETUNE, image_size=(48, 48),
                          resample_posemb=True)),
      dict(name="fine-tune 48, fresh posemb", config=CONFIG,
           overrides=dict(FINETUNE, image_size=(48, 48),
                          dont_load=("posembed_input",))),
  ]
  return dict(settings=settings, seeds=(0, 1, 2),
              metrics=["eval/accuracy", "fewshot/canvas/10shot"],
              report=report)
