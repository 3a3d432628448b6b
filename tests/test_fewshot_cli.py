"""`python -m vit_jax.fewshot`: a workdir and a .npz give the same report;
what it prints and writes."""

import json
import os
import re

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


def _written(out):
  """The files a call printed that it wrote: {stem: json path}."""
  paths = {}
  for line in out.splitlines():
    if line.startswith("wrote "):
      path, png = line[len("wrote "):].split(" and ")[:2]
      stem = os.path.basename(path)[:-len(".json")]
      assert png.split()[0] == stem + ".png", line
      paths[stem] = path
  return paths


def _read(path):
  with open(path) as f:
    return json.load(f)


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def test_workdir_and_npz_give_the_same_report(tmp_path, params, capsys):
  """Also: outputs named after what they evaluated, none replacing another;
  tables headed by the representation and its checkpoint; the floor; a
  chosen L2 at the grid's edge warned of."""
  run_dir = str(tmp_path / "run")
  os.makedirs(run_dir)
  _workdir(run_dir, params)
  # The run's own few-shot fields, with the raw-pixel floor.
  assert cli.run(["fewshot", f"--workdir={run_dir}", "--floor"]) == 0
  out = capsys.readouterr().out
  assert f"few-shot linear evaluation of pre_logits: {run_dir} step 3\n" in out
  assert "the raw-pixel floor (no model)\n" in out and "±" in out
  written = _written(out)
  # Named after what they evaluated; both in the workdir.
  model_name, = [n for n in written if n.startswith("fewshot_pre_logits")]
  floor_name, = [n for n in written if n.startswith("fewshot_pixels")]
  assert os.path.dirname(written[model_name]) == run_dir
  assert f"raw-pixel floor drawn from {written[floor_name]}" in out
  from_workdir = _read(written[model_name])
  assert from_workdir["representation"] == "pre_logits"
  assert from_workdir["source"] == {"workdir": run_dir, "step": 3,
                                    "use_ema": False}
  assert from_workdir["config"]["shots"] == [1, 5]
  assert from_workdir["config"]["image_size"] == [16, 16]
  env = from_workdir["environment"]  # What a re-run must match it on.
  assert env["cpu"] and "jax" in env["packages"] and env["cores"] >= 1
  results = from_workdir["results"]
  assert set(results["digits"]) == {"1", "5"}
  for r in results["digits"].values():
    assert 0.0 <= r["mean"] <= 1.0 and len(r["l2"]) == 2
    assert r["fixed_l2"] == 1024.0
  floor = _read(written[floor_name])
  assert floor["representation"] == "pixels" and floor["source"] == {}
  assert floor["config"]["shots"] == [1, 5]
  for name in written:
    with PIL.Image.open(os.path.join(run_dir, name + ".png")) as img:
      assert img.size[0] > 100

  # Another representation and other fields, in the same directory: new
  # files; a too narrow L2 grid (2^10, 2^12) is warned of and recorded.
  before = {n: _bytes(p) for n, p in written.items()}
  assert cli.run(["fewshot", f"--workdir={run_dir}",
                  f"--config={ROOT}/configs/fewshot.py:digits,pixels",
                  "--config.shots=(1,)", "--config.seeds=(0,)",
                  "--config.l2_regs=(4096.,)"]) == 0
  out = capsys.readouterr().out
  assert "few-shot linear evaluation of raw pixels (no model)\n" in out
  pixels_name, = _written(out)
  assert pixels_name.startswith("fewshot_pixels") and pixels_name not in before
  edge = [l for l in out.splitlines() if "grid" in l and "warning" in l]
  assert len(edge) == 1 and re.match(
      r"warning: fewshot digits 1-shot \(pixels\): leave-one-out chose "
      r"L2 = 2\^1[02] for seed\(s\) 0, the (smallest|largest) of the grid "
      r"2\^10 \.\. 2\^12; .*: widen the few-shot config's l2_regs "
      r"(below|above) 2\^1[02] \(training: --config\.evals\.fewshot\.l2_regs"
      r"=\.\.\.; python -m vit_jax\.fewshot: --config\.l2_regs=\.\.\.\)$",
      edge[0]), out
  narrow = _read(os.path.join(run_dir, pixels_name + ".json"))
  assert narrow["l2_at_grid_edge"] is True
  assert narrow["results"]["digits"]["1"]["l2_at_grid_edge"] is True
  assert set(os.listdir(run_dir)) >= {
      n + e for n in [*before, pixels_name] for e in (".json", ".png")}
  for n, content in before.items():
    assert _bytes(written[n]) == content, n

  out_dir = str(tmp_path / "npz")
  path = str(tmp_path / "tiny.npz")
  npz.save_npz(path, params)
  argv = ["fewshot", f"--workdir={out_dir}", f"--init={path}",
          "--model=testing", "--override=patch_size=4",
          "--override=image_size=(16, 16)", "--override=hidden_size=16",
          f"--config={ROOT}/configs/fewshot.py:digits,pre_logits,runlocal",
          "--config.batch_size=360"]
  assert cli.run(argv) == 0
  out = capsys.readouterr().out
  assert "few-shot linear evaluation of pre_logits: tiny.npz (testing)\n" in out
  assert "no raw-pixel floor drawn: pass --floor" in out
  npz_name, = _written(out)
  assert npz_name.startswith("fewshot_pre_logits_tiny_")
  from_npz = _read(os.path.join(out_dir, npz_name + ".json"))
  assert from_npz["source"]["init"] == path
  # The same parameters through another loader: the same L2 choices, and
  # accuracies within one of the test images.
  num_test = len(sources.digits_split_indices()[1])
  report_compare.assert_close(from_npz["results"], results,
                              atol=1.01 / num_test,
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
