"""Writes the untrained digits ViT (configs/digits.py architecture) as .npz.

  python experiments/fewshot_digits/random_init_npz.py /tmp/digits_init.npz

The parameters are the model's initialisation with seed 0.
"""

import argparse


def main(path):
  # Imported here: `--help` answers without loading JAX.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  model = models.create(
      "testing", num_classes=10, image_size=(16, 16), num_channels=1,
      patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)},
                               np.zeros((1, 16, 16, 1), np.float32))["params"]
  npz.save_npz(path, jax.device_get(params))
  print(f"wrote {path}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(
      prog="python experiments/fewshot_digits/random_init_npz.py",
      description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("path", nargs="?", default="/tmp/digits_random_init.npz",
                      help="the .npz to write (default: %(default)s)")
  main(parser.parse_args().path)
