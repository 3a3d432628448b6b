"""The command line: one-line errors, and falling back from a bad checkpoint."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from vit_jax import checkpoint
from vit_jax import compilation_cache
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


@pytest.fixture
def jax_cache_config():
  """JAX's config; conftest restores its compilation cache options after
  the test."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.config


def test_unwritable_workdir(capfd, tmp_path, jax_cache_config):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  rc, out = _run(capfd, *TINY, f"--workdir={blocker / 'sub'}",
                 f"--compilation_cache={blocker / 'cache'}")
  assert rc == 1
  assert f"error: cannot write to workdir {blocker / 'sub'}" in out
  assert "pass a writable --workdir" in out
  assert "Traceback" not in out
  # A cache directory that cannot be created is a warning, not an error.
  assert (f"warning: cannot use the compilation cache directory "
          f"{blocker / 'cache'}") in out
  assert not jax_cache_config.jax_enable_compilation_cache


def test_compilation_cache_directories(tmp_path, monkeypatch,
                                       jax_cache_config):
  monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "env"))
  assert compilation_cache.default_dir() == str(tmp_path / "env")
  monkeypatch.delenv("VIT_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.default_dir() == str(tmp_path / "xdg" / "vit_jax" /
                                                "xla")
  directory = compilation_cache.setup(str(tmp_path / "cache"))
  assert directory == str(tmp_path / "cache")
  assert os.stat(directory).st_mode & 0o777 == 0o700
  assert jax_cache_config.jax_compilation_cache_dir == directory
  assert jax_cache_config.jax_enable_compilation_cache
  assert jax_cache_config.jax_persistent_cache_min_compile_time_secs <= 0.1
  # None keeps the directory chosen before (a sweep's, for its points); a
  # sweep's own default wins over it, but not over one JAX got elsewhere.
  assert compilation_cache.setup() == directory
  other, own = str(tmp_path / "other"), str(tmp_path / "own")
  assert compilation_cache.setup(default=other) == other
  jax_cache_config.update("jax_compilation_cache_dir", own)
  assert compilation_cache.setup(default=other) == own
  assert compilation_cache.setup("") is None
  assert not jax_cache_config.jax_enable_compilation_cache


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
  assert "compilation cache: " in out
  assert re.search(r"^  time +[0-9.]+ s: setup [0-9.]+ s, training [0-9.]+ s",
                   out, re.M), out
  assert re.search(r"^  XLA +compiled \d+ programs in ", out, re.M), out
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
  assert "checkpoint at step 4 is damaged" in out
  assert "falling back to the previous one" in out
  assert "resumed from the checkpoint at step 2" in out
  assert "Traceback" not in out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
  assert sorted(os.listdir(ckpts)) == ["4", "6"]
  steps = [r["step"] for r in metrics.read_jsonl(workdir) if "train/loss" in r]
  # The rows the first run wrote past step 2 are replaced, not repeated.
  assert steps == [1, 2, 3, 4, 5, 6]
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


def test_metric_writer_does_not_import_torch(tmp_path):
  # tensorboardX imports PyTorch if it can; a training run has no use for it.
  code = ("import sys; from vit_jax import metrics; "
          f"w = metrics.MetricWriter({str(tmp_path)!r}, 1, progress=False); "
          "w.write(1, {'loss': 0.5}); w.close(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "[]"
  assert os.listdir(tmp_path / "tb")
  assert metrics.read_jsonl(str(tmp_path))[0]["loss"] == 0.5
