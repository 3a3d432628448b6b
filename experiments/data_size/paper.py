"""Paper scale: ViT-B/16 vs BiT-R50x1 vs R50+B/16 on ImageNet subsets.

  python -m vit_jax.sweep --config=experiments/data_size/paper.py \
      --workdir=ROOT --set=data_dir=/data/tfds --point=K

`configs/pretrain.py:<variant>,imagenet2012` on 10%, 30% and 99% of the
training split (the last 1% is held out by the config), the same epochs
for each; one job per point on accelerators.
"""

VARIANTS = {"B/16": "ViT-B/16", "BiT-R50x1": "BiT-R50x1",
            "R50+B/16": "R50+B/16"}


def get_sweep():
  settings = []
  for variant, label in VARIANTS.items():
    for percent in (10, 30, 99):
      settings.append(dict(
          name=f"{label} {percent}%",
          config=f"configs/pretrain.py:{variant},imagenet2012",
          overrides={"train_split": f"train[:{percent}%]"}))
  return dict(settings=settings, seeds=(0,), metrics=["eval/accuracy"])
