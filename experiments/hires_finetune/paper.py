"""Paper scale: ViT-B/16 pre-trained at 224, fine-tuned on ImageNet at 384.

  python -m vit_jax.sweep --config=experiments/hires_finetune/paper.py \
      --workdir=ROOT --set=data_dir=/data/tfds --point=K

Pre-training `configs/pretrain.py:B/16,imagenet2012`, then
`configs/vit.py:B/16,imagenet2012` fine-tuning (SGD, 20k steps) at 224, and
at 384 with the position embeddings resampled or fresh. Run the
pre-training point first (points 0, then 1-3).
"""

FINETUNE = {"init": "{root}/pre-train_224_s{seed}"}


def get_sweep():
  ft = "configs/vit.py:B/16,imagenet2012"
  return dict(
      settings=[
          dict(name="pre-train 224",
               config="configs/pretrain.py:B/16,imagenet2012", overrides={}),
          dict(name="fine-tune 224", config=ft,
               overrides=dict(FINETUNE, image_size=(224, 224))),
          dict(name="fine-tune 384, resampled", config=ft,
               overrides=dict(FINETUNE, resample_posemb=True)),
          dict(name="fine-tune 384, fresh posemb", config=ft,
               overrides=dict(FINETUNE, dont_load=("posembed_input",))),
      ],
      seeds=(0,), metrics=["eval/accuracy"])
