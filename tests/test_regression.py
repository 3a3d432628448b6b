"""The regression task: a digit-value regressor on `digits_value`, and its
own evaluator under a classification config."""

import jax
import numpy as np

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import metrics
from vit_jax import train

from test_sharding import tiny_config  # pylint: disable=g-bad-import-order
from test_train import TINY, _env, _finish, _main  # pylint: disable=g-bad-import-order,protected-access

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


def test_regression_task_brings_its_evaluator(tmp_path):
  """configs/digits.py (a classification evaluator) under
  --config.task=regression: the task's regression evaluator replaces it."""
  workdir = str(tmp_path / "run")
  rc, out = _finish(_main(
      TINY + ["--config.task=regression",
                         "--config.evals.eval.every=2",
                         f"--workdir={workdir}"], _env(8)))
  assert rc == 0, out[-3000:]
  assert ("note: the model of the regression task outputs values, which "
          "evals.eval (classification) cannot read: evaluating with "
          "evals.eval (regression) instead") in out
  assert "NaN or Inf" not in out
  rows = [r for r in metrics.read_jsonl(workdir) if "eval/mse" in r]
  assert [r["step"] for r in rows] == [2, 3]
  for row in metrics.read_jsonl(workdir):
    assert not any(k.startswith("eval/") and k not in (
        "eval/mse", "eval/mae", "eval/num_examples", "eval/skipped_images")
                   for k in row), row
    assert all(np.isfinite(v) for v in row.values()), row
  # The final MSE and MAE, recomputed from the checkpoint on the whole test
  # split as one batch in float64.
  params, model, _ = checkpoint.model_from_workdir(workdir)
  source = data.get_source("digits", "test")
  batch = next(data.eval_batches(source, len(source), (8, 8)))
  output, _ = model.apply({"params": params}, batch["image"], train=False)
  err = np.asarray(output, np.float64)[:, 0] - source.labels
  assert output.shape == (360, 1)
  np.testing.assert_allclose(rows[-1]["eval/mse"], np.mean(err**2), rtol=1e-5)
  np.testing.assert_allclose(rows[-1]["eval/mae"], np.mean(np.abs(err)),
                             rtol=1e-5)
