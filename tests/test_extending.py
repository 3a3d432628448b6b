"""A task and an evaluator of one's own: one file each plus a config line.

The evaluator is the README's "Extending" example, taken from the README
itself, so the documented code is the tested code.
"""

import re
import sys

import numpy as np

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import metrics
from vit_jax import train

from test_sharding import ROOT, tiny_config  # pylint: disable=g-bad-import-order

TASK = '''
"""Predict each image's mean pixel value (labels unused)."""
import jax.numpy as jnp
from vit_jax import losses

class Task:
  def __init__(self, config, source):
    self.model_fields = dict(num_classes=1)

  def loss(self, model, params, batch, rngs):
    target = jnp.mean(batch["image"], axis=(1, 2, 3))
    out, _ = model.apply({"params": params}, batch["image"], train=True,
                         rngs={"dropout": rngs["dropout"]})
    return losses.mse(out, target), {"target_mean": jnp.mean(target)}
'''


def _readme_evaluator():
  with open(f"{ROOT}/README.md") as f:
    readme = f.read()
  blocks = re.findall(r"```python\n(# vit_jax/evaluators/mean_output.py.*?)```",
                      readme, re.S)
  assert len(blocks) == 1
  return blocks[0]


def test_own_task_and_evaluator(tmp_path, monkeypatch):
  (tmp_path / "my_task.py").write_text(TASK)
  (tmp_path / "my_eval.py").write_text(_readme_evaluator())
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny_config(task="my_task")
  config.evals.mine = dict(type="my_eval", every=0)
  config.evals.eval.every = -1  # Off: the model has one output.
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  rows = metrics.read_jsonl(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert len(train_rows) == 3
  # The task's own metric: the mean pixel of each step's batch, rebuilt from
  # the seed by the training loader.
  source = data.get_source("digits", "train")
  batches = iter(train._train_loader(config, source, (8, 8)))  # pylint: disable=protected-access
  want = [np.mean(np.asarray(next(batches)["image"], np.float64))
          for _ in range(3)]
  np.testing.assert_allclose([r["train/target_mean"] for r in train_rows],
                             want, rtol=1e-5, atol=1e-7)
  # The evaluator's mean output: the final parameters on the whole test split.
  params, model, _ = checkpoint.model_from_workdir(workdir)
  test = data.get_source("digits", "test")
  images = next(data.eval_batches(test, len(test), (8, 8)))["image"]
  output, _ = model.apply({"params": params}, images, train=False)
  assert output.shape == (360, 1)
  np.testing.assert_allclose(results["mine/mean_output"],
                             np.mean(np.asarray(output, np.float64)),
                             rtol=1e-5, atol=1e-7)
  assert not any(k.startswith("eval/") for k in results)
  del sys.modules["my_task"], sys.modules["my_eval"]
