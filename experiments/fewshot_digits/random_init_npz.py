"""Writes the untrained digits ViT (configs/digits.py architecture) as .npz.

  python experiments/fewshot_digits/random_init_npz.py /tmp/digits_init.npz
"""

import sys

import jax
import numpy as np

from vit_jax import models
from vit_jax import npz


def main(path):
  model = models.create(
      "testing", num_classes=10, image_size=(16, 16), num_channels=1,
      patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128)
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)},
                               np.zeros((1, 16, 16, 1), np.float32))["params"]
  npz.save_npz(path, jax.device_get(params))
  print(f"wrote {path}")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/digits_random_init.npz")
