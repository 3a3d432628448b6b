"""Checkpoint conversion: our .npz <-> Hugging Face ViT, our .npz <-> timm.

  python -m vit_jax.convert --from=DIR|FILE.npz|HF_DIR|TIMM_DIR|FILE.safetensors|FILE.pth \
      --to={hf,timm,npz} --out=PATH [--timm_model=NAME|--timm_kwargs=FILE.json] [--verify]

Modules: `hf` and `timm` (mappings, export, import), `infer` (model fields from
parameter shapes), `parity` (ours vs theirs on the same batch), `cli`.
"""
