"""Entry point: `python -m vit_jax.convert --from=SRC --to={hf,timm,npz} --out=PATH`."""

import sys

from vit_jax.convert import cli

if __name__ == "__main__":
  sys.exit(cli.main())
