"""The command line: one-line errors, and falling back from a bad checkpoint."""

import os
import shutil

import pytest

from vit_jax import checkpoint
from vit_jax import main
from vit_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config=configs/digits.py:runlocal", "--config.total_steps=4",
    "--config.log_steps=1", "--config.evals.eval.every=0",
    "--config.checkpoint_steps=2", "--config.evals.fewshot.every=-1",
    "--config.progress=False", "--config.batch_size=16",
    "--config.eval_batch_size=120", "--config.image_size=(8, 8)",
    "--config.model.hidden_size=16", "--config.model.mlp_dim=32",
    "--config.model.num_heads=4", "--config.model.patch_size=4",
]


# Tuple fields given twice are concatenated by ml_collections, so a test that
# changes `image_size` drops it from TINY first.


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def _run(capfd, *args):
  rc = main.run(["vit_jax.main", *args])
  out, err = capfd.readouterr()
  return rc, out + err


@pytest.mark.parametrize("args,message", [
    (["--config=configs/vit.py:X/99,cifar10"], "error: unknown variant 'X/99'"),
    (["--config=configs/vit.py:B/16,mnist2"], "error: unknown dataset 'mnist2'"),
    (["--config=configs/pretrain.py:Q/16,imagenet2012"],
     "error: unknown variant 'Q/16'"),
    (TINY + ["--config.dataset=no_such_dataset"],
     "error: cannot load dataset 'no_such_dataset'"),
    ([a for a in TINY if "image_size" not in a] +
     ["--config.image_size=(10, 8)"],
     "error: image size (10, 8) is not divisible by patch size 4"),
    (TINY + ["--config.batch_size=12"],
     "error: batch_size=12 is not divisible by the 8 devices"),
    (TINY + ["--config.mesh=(('data', 3), ('model', 1))"],
     "error: mesh (('data', 3), ('model', 1)) needs 3 devices"),
    (TINY + ["--config.no_such_field=1"],
     "error: unknown config field no_such_field"),
    (TINY + ["--config.optim.name=nope"], "error: unknown optimizer 'nope'"),
])
def test_bad_input_is_one_line(capfd, tmp_path, args, message):
  rc, out = _run(capfd, *args, f"--workdir={tmp_path / 'w'}")
  assert rc == 1
  assert message in out, out
  assert "Traceback" not in out
  assert len([l for l in out.splitlines() if l.startswith("error:")]) == 1


def test_unwritable_workdir(capfd, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  rc, out = _run(capfd, *TINY, f"--workdir={blocker / 'sub'}")
  assert rc == 1
  assert f"error: cannot write to workdir {blocker / 'sub'}" in out
  assert "pass a writable --workdir" in out
  assert "Traceback" not in out


def test_missing_workdir_or_config(capfd, tmp_path):
  rc, out = _run(capfd, *TINY)
  assert rc == 1 and "error: pass --workdir=DIR" in out
  rc, out = _run(capfd, "--config=configs/absent.py", f"--workdir={tmp_path}")
  assert rc == 1 and "error: cannot load the config file configs/absent.py" in (
      out), out
  assert "Traceback" not in out


def test_corrupt_latest_checkpoint_falls_back(capfd, tmp_path):
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, *TINY, f"--workdir={workdir}")
  assert rc == 0, out
  ckpts = os.path.join(workdir, "checkpoints")
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  good = checkpoint.latest_params(workdir)[0]
  # A different model config in the same workdir is refused, not "corrupt".
  rc, out = _run(capfd, *TINY, "--config.model.hidden_size=32",
                 f"--workdir={workdir}")
  assert rc == 1 and "was written with another model config" in out, out
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  os.remove(os.path.join(ckpts, "4", "state", "manifest.ocdbt"))
  # Resuming falls back to step 2, says so, and keeps the bad one aside.
  rc, out = _run(capfd, *TINY, "--config.total_steps=6",
                 f"--workdir={workdir}")
  assert rc == 0, out
  assert "checkpoint at step 4 is unreadable" in out
  assert "falling back to the previous one" in out
  assert "resumed from the checkpoint at step 2" in out
  assert "Traceback" not in out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
  assert sorted(os.listdir(ckpts)) == ["4", "6"]
  steps = [r["step"] for r in metrics.read_jsonl(workdir) if "train/loss" in r]
  assert steps == [1, 2, 3, 4, 3, 4, 5, 6]
  assert set(checkpoint.flatten(good)) == set(
      checkpoint.flatten(checkpoint.latest_params(workdir)[0]))
  shutil.rmtree(workdir)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(capfd, tmp_path):
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, *TINY, "--config.checkpoint_steps=1",
                 "--config.optim.name=sgd", "--config.optim.lr=1e30",
                 "--config.optim.schedule=constant",
                 "--config.optim.warmup_steps=0", f"--workdir={workdir}")
  assert rc == 1, out
  line = [l for l in out.splitlines() if l.startswith("error:")][0]
  assert " at step " in line and "lower --config.optim.lr" in line, out
  assert "Traceback" not in out
  bad_step = int(line.split(" at step ")[1].split(";")[0])
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                         "checkpoints")))
  assert saved == list(range(1, bad_step))
  params, _ = checkpoint.latest_params(workdir)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
