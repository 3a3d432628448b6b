"""The regression task: a digit-value regressor on `digits_value`."""

import jax
import numpy as np

from vit_jax import data
from vit_jax import metrics
from vit_jax import train

from test_sharding import tiny_config  # pylint: disable=g-bad-import-order

# Predicting the mean value (4.5 +- 2.9) everywhere gives an MSE of about 8.2.
MAX_MSE = 2.0


def test_digit_value_regressor(tmp_path):
  config = tiny_config(task="regression", dataset="digits_value",
                       total_steps=400, log_steps=100)
  # Width 32, 2 layers, 4 patches of 4x4; the head starts at the mean value.
  config.model.update(dict(hidden_size=32, mlp_dim=64, num_layers=2,
                           head_bias_init=4.5))
  config.pp.inception_crop = False
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.batch_size = 64
  config.evals = dict(eval=dict(type="regression", every=0))
  workdir = str(tmp_path / "run")
  # Two devices: sharding is not the point here, and 400 steps of eight
  # device threads on two cores is what made XLA's collectives time out.
  results = train.train_and_evaluate(config, workdir,
                                     devices=jax.devices()[:2])
  labels = data.get_source("digits_value", "test").labels
  baseline = float(np.mean((labels - labels.mean()) ** 2))
  assert baseline > 8
  assert results["eval/num_examples"] == len(labels) == 360
  assert results["eval/mse"] < MAX_MSE, results
  assert results["eval/mae"] ** 2 <= results["eval/mse"] + 1e-6
  rows = [r for r in metrics.read_jsonl(workdir) if "train/loss" in r]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
