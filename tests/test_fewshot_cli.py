"""`python -m vit_jax.fewshot`: a workdir and a .npz give the same report."""

import json
import os

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from vit_jax import checkpoint
from vit_jax import config_utils
from vit_jax import model_source
from vit_jax import errors
from vit_jax import fewshot as cli
from vit_jax import models
from vit_jax import npz
from vit_jax.data import sources

import report_compare  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
             mlp_dim=32, image_size=(16, 16), num_channels=1, num_classes=10)


@pytest.fixture(scope="module")
def params():
  model = models.create("testing", **MODEL)
  return jax.device_get(jax.jit(model.init)(
      {"params": jax.random.PRNGKey(1)},
      np.zeros((1, 16, 16, 1), np.float32))["params"])


def _workdir(path, params):
  config = config_utils.default_config()
  config.model_name = "testing"
  config.evals.fewshot = ml_collections.ConfigDict(dict(
      type="fewshot", every=0, datasets=(("digits", "digits", "train", "test"),), shots=(1, 5),
      seeds=(0, 1), batch_size=360, representation="pre_logits"))
  config_utils.save_config(config, path, extra={"resolved": dict(
      num_classes=10, image_size=[16, 16], num_channels=1,
      model_kwargs=MODEL)})
  mngr = checkpoint.Manager(path, max_to_keep=1)
  mngr.save(3, {"params": params, "step": np.int32(3)}, {"step": 3})
  mngr.close()


def test_workdir_and_npz_give_the_same_report(tmp_path, params, capsys):
  run_dir = str(tmp_path / "run")
  os.makedirs(run_dir)
  _workdir(run_dir, params)
  assert cli.run(["fewshot", f"--workdir={run_dir}"]) == 0
  table = capsys.readouterr().out
  assert "digits" in table and "±" in table
  with open(os.path.join(run_dir, "fewshot.json")) as f:
    from_workdir = json.load(f)
  assert set(from_workdir["digits"]) == {"1", "5"}
  for r in from_workdir["digits"].values():
    assert 0.0 <= r["mean"] <= 1.0 and len(r["l2"]) == 2
    assert r["fixed_l2"] == 1024.0
  with PIL.Image.open(os.path.join(run_dir, "fewshot.png")) as img:
    assert img.size[0] > 100

  out_dir = str(tmp_path / "npz")
  path = str(tmp_path / "tiny.npz")
  npz.save_npz(path, params)
  argv = ["fewshot", f"--workdir={out_dir}", f"--init={path}",
          "--model=testing", "--override=patch_size=4",
          "--override=image_size=(16, 16)", "--override=hidden_size=16",
          f"--config={ROOT}/configs/fewshot.py:digits,pre_logits,runlocal",
          "--config.batch_size=360"]
  assert cli.run(argv) == 0
  with open(os.path.join(out_dir, "fewshot.json")) as f:
    from_npz = json.load(f)
  # The same parameters through another loader: the same L2 choices, and
  # accuracies within one of the test images.
  num_test = len(sources.digits_split_indices()[1])
  report_compare.assert_close(from_npz, from_workdir, atol=1.01 / num_test,
                              exact_keys=("l2", "fixed_l2"))


def test_errors(tmp_path, capsys):
  assert cli.run(["fewshot"]) == 1
  assert "--workdir" in capsys.readouterr().err
  assert cli.run(["fewshot", f"--workdir={tmp_path}",
                  f"--init={tmp_path}/missing.npz", "--model=testing"]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert cli.run(["fewshot", f"--workdir={tmp_path}"]) == 1
  assert "config.json not found" in capsys.readouterr().err
  with pytest.raises(errors.Error, match="name=value"):
    model_source.parse_overrides(["classifier"])
  assert model_source.parse_overrides(["classifier=gap", "image_size=(8, 4)"]) == {
      "classifier": "gap", "image_size": (8, 4)}
