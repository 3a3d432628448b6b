"""Paper scale: class token vs GAP for ViT-B/16 on ImageNet, over lr.

  python -m vit_jax.sweep --config=experiments/cls_vs_gap/paper.py \
      --workdir=ROOT --set=data_dir=/data/tfds --point=K

`configs/pretrain.py:B/16,imagenet2012` with either pooling at the
learning rates around the paper's Figure 9 (8e-4 for the token, 3e-4 for
GAP); one job per point on accelerators.
"""

LRS = (3e-4, 8e-4, 3e-3)


def get_sweep():
  return dict(
      settings=[dict(name=f"{label} lr={lr:g}",
                     config="configs/pretrain.py:B/16,imagenet2012",
                     overrides={"model.classifier": pool, "optim.lr": lr})
                for pool, label in (("token", "class token"), ("gap", "GAP"))
                for lr in LRS],
      seeds=(0,), metrics=["eval/accuracy"])
