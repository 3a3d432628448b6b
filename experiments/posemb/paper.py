"""Paper scale: position embeddings of ViT-B/16 pre-trained on ImageNet.

  python -m vit_jax.sweep --config=experiments/posemb/paper.py \
      --workdir=ROOT --set=data_dir=/data/tfds --point=K

`configs/pretrain.py:B/16,imagenet2012` (300 epochs, batch 4096) with each
position embedding of the small study; one job per point on accelerators.
"""

KINDS = {"none": "none", "learn": "learned 1-D", "learn2d": "learned 2-D",
         "sincos2d": "sincos 2-D", "relative": "relative"}


def get_sweep():
  return dict(
      settings=[dict(name=name, config="configs/pretrain.py:B/16,imagenet2012",
                     overrides={"model.posemb": kind})
                for kind, name in KINDS.items()],
      seeds=(0,), metrics=["eval/accuracy"])
