"""Faults and bad inputs around a training workdir, through the command line.

Each case runs `vit_jax.main` as a user does (its `run(argv)`, or
`python -m vit_jax.main` where a second process is the point) on a copy of
one small trained workdir, and checks that the run either goes on from the
right checkpoint or stops with one `error:` line, exit status 1, no
traceback, and the good checkpoints left where they were.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import main
from vit_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TINY: 4 steps of a tiny ViT on the digits, checkpoints at steps 2 and 4;
# `_run` runs main in this process; `_in_repo_root` (autouse) runs each test
# in the repository's root.
from test_main import TINY, _in_repo_root, _run  # pylint: disable=g-bad-import-order,unused-import,wrong-import-position


def _error_line(out):
  """The one `error:` line of a failed run (and no traceback)."""
  lines = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, out
  assert "Traceback" not in out, out
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir trained for 4 steps (checkpoints 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("trained") / "w")
  assert main.run(["vit_jax.main", *TINY, f"--workdir={workdir}"]) == 0
  return workdir


@pytest.fixture(scope="module")
def resumed_from_2(trained, tmp_path_factory):
  """The state of the trained run resumed from its step-2 checkpoint (step
  4's removed) and trained to step 6: where a fall-back to step 2 must end."""
  path = str(tmp_path_factory.mktemp("from2") / "w")
  shutil.copytree(trained, path)
  shutil.rmtree(os.path.join(path, "checkpoints", "4"))
  assert main.run(["vit_jax.main", *TINY, "--config.total_steps=6",
                   f"--workdir={path}"]) == 0
  return checkpoint.latest_state(path)


@pytest.fixture
def workdir(trained, tmp_path):
  """A fresh copy of the trained workdir."""
  path = str(tmp_path / "w")
  shutil.copytree(trained, path)
  return path


def _steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir,
                                                        "checkpoints"))
                if s.isdigit())


def _state_files(workdir, step):
  """The data files of a checkpoint's arrays (tensorstore's `d/` folders;
  not every one of them need be referenced by the checkpoint)."""
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
           if os.path.basename(d) == "d"]
  assert files, root
  return files


def test_another_optimizer_or_ema_is_refused_and_nothing_moves(capfd,
                                                               workdir):
  for override, what in (("--config.optim.name=sgd", "optimizer"),
                         ("--config.optim.ema_decay=0.9", "EMA")):
    rc, out = _run(capfd, *TINY, "--config.total_steps=6", override,
                   f"--workdir={workdir}")
    assert rc == 1, out
    line = _error_line(out)
    assert f"was written with another {what} config" in line, line
    assert _steps(workdir) == [2, 4]
    assert not os.path.exists(os.path.join(workdir, "corrupt_checkpoints"))
  rc, out = _run(capfd, *TINY, "--config.total_steps=6",
                 f"--workdir={workdir}")
  assert rc == 0 and "resumed from the checkpoint at step 4" in out, out


def test_no_usable_checkpoint_stops_unless_fresh_start(capfd, workdir):
  for step in (2, 4):
    for path in _state_files(workdir, step):
      with open(path, "r+b") as f:
        f.truncate(3)
  rc, out = _run(capfd, *TINY, f"--workdir={workdir}")
  assert rc == 1, out
  line = _error_line(out)
  assert "no usable checkpoint is left" in line, line
  assert "--config.fresh_start=True" in line, line
  assert len(out.splitlines()) < 20, out
  assert sorted(os.listdir(os.path.join(workdir, "corrupt_checkpoints"))) == [
      "2", "4"]
  # The same command again still refuses (the damaged ones are set aside).
  rc, out = _run(capfd, *TINY, f"--workdir={workdir}")
  assert rc == 1 and "no usable checkpoint is left" in _error_line(out), out
  rc, out = _run(capfd, *TINY, "--config.fresh_start=True",
                 f"--workdir={workdir}")
  assert rc == 0, out
  assert "resumed" not in out
  assert _steps(workdir) == [2, 4]
  # metrics.jsonl holds the new run's rows once.
  steps = [r["step"] for r in metrics.read_jsonl(workdir)
           if "train/loss" in r]
  assert steps == [1, 2, 3, 4]


def test_diverging_run_keeps_only_finite_checkpoints(capfd, tmp_path):
  workdir = str(tmp_path / "w")
  args = [*TINY, "--config.checkpoint_steps=1",
          "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
          "--config.optim.clip_norm=0", f"--workdir={workdir}"]
  # inf in float32: refused before anything runs.
  rc, out = _run(capfd, *args, "--config.optim.lr=1e39")
  assert rc == 1 and "--config.optim.lr=1e+39 is invalid" in _error_line(
      out), out
  # Finite, but the first update's decoupled weight decay (lr x 100 x the
  # kernels) overflows float32 while the first loss is still finite: no
  # checkpoint of that state is written.
  rc, out = _run(capfd, *args, "--config.optim.lr=3.4e38",
                 "--config.optim.weight_decay=100")
  assert rc == 1, out
  line = _error_line(out)
  assert "not finite at step 1" in line and "lower --config.optim.lr" in line
  ckpts = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(ckpts) or not os.listdir(ckpts)


def _resumes_from_step_2(capfd, workdir, reference):
  """Resuming says step 4 is damaged, sets it aside and goes on from 2, to
  the state of a clean resume from step 2 (`reference`), bit for bit (the
  same computation on the same devices)."""
  rc, out = _run(capfd, *TINY, "--config.total_steps=6",
                 f"--workdir={workdir}")
  assert rc == 0, out
  assert "checkpoint at step 4 is damaged" in out, out
  assert "resumed from the checkpoint at step 2" in out, out
  assert "Traceback" not in out
  assert os.path.isdir(os.path.join(workdir, "corrupt_checkpoints", "4"))
  step, state = checkpoint.latest_state(workdir)
  assert step == reference[0] == 6
  assert jax.tree.structure(state) == jax.tree.structure(reference[1])
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state),
                          jax.tree.leaves(reference[1])):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  return [l for l in out.splitlines() if "is damaged" in l][0]


def test_flipped_bit_is_damage_and_falls_back(capfd, workdir,
                                              resumed_from_2):
  # One bit flipped in the middle of each data file.
  for data_file in _state_files(workdir, 4):
    with open(data_file, "r+b") as f:
      f.seek(os.path.getsize(data_file) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0x10]))
  _resumes_from_step_2(capfd, workdir, resumed_from_2)


def test_array_unlike_its_checksum_is_damage(capfd, workdir, resumed_from_2):
  # As an array with a flipped bit that the storage layer did not notice:
  # the checksum stored for it no longer matches what reads back.
  path = os.path.join(workdir, "checkpoints", "4", "data", "metadata")
  with open(path) as f:
    stored = json.load(f)
  name = "params/head/kernel"
  stored["checksums"][name] ^= 1 << 5
  with open(path, "w") as f:
    json.dump(stored, f)
  line = _resumes_from_step_2(capfd, workdir, resumed_from_2)
  assert f"checksum mismatch in 1 array(s): {name}" in line, line


def test_garbage_data_state_falls_back(capfd, workdir, resumed_from_2):
  path = os.path.join(workdir, "checkpoints", "4", "data", "metadata")
  with open(path) as f:
    stored = json.load(f)
  stored["data"] = "{garbage"
  with open(path, "w") as f:
    json.dump(stored, f)
  _resumes_from_step_2(capfd, workdir, resumed_from_2)


def test_resume_rewrites_metrics_past_the_checkpoint(capfd, workdir):
  # As a run killed after step 4's rows but before its checkpoint: rows of
  # steps 3-4 and a half-written line are on disk, the checkpoint is gone.
  reference = metrics.read_jsonl(workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "train/lo')
  rc, out = _run(capfd, *TINY, f"--workdir={workdir}")
  assert rc == 0 and "resumed from the checkpoint at step 2" in out, out
  rows = metrics.read_jsonl(workdir)
  strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/")}
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  # The same steps again, bit for bit (the same computation on 8 devices).
  assert [strip(r) for r in rows] == [strip(r) for r in reference]
  assert sum("data/skipped_images" in r for r in rows) == 1


def test_second_process_on_a_workdir_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  env = dict(os.environ, PYTHONPATH=ROOT)
  first = subprocess.Popen(
      [sys.executable, "-m", "vit_jax.main", *TINY,
       "--config.total_steps=100000", "--config.checkpoint_steps=0",
       f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    lock = os.path.join(workdir, ".lock")
    deadline = time.time() + 120
    while time.time() < deadline and not (
        os.path.exists(lock) and open(lock).read().strip()):
      assert first.poll() is None, "the first run ended early"
      time.sleep(0.2)
    second = subprocess.run(
        [sys.executable, "-m", "vit_jax.main", *TINY, f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stdout + second.stderr
    line = _error_line(second.stdout + second.stderr)
    assert f"{workdir} is in use by process {first.pid}" in line, line
  finally:
    first.kill()
    first.wait()
  # The lock of a killed run never blocks the next one.
  third = subprocess.run(
      [sys.executable, "-m", "vit_jax.main", *TINY, f"--workdir={workdir}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert third.returncode == 0, third.stdout + third.stderr


def _du(path):
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, fs in os.walk(path) for f in fs)


def test_disk_full_while_saving_is_one_line(trained, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  size = _du(trained) + (4 << 20)
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
      capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip("mounting a small tmpfs needs root here: "
                + mounted.stderr.decode().strip())
  try:
    workdir = str(disk / "w")
    shutil.copytree(trained, workdir)
    # Fill the disk up to a third of one checkpoint's size.
    one = _du(os.path.join(workdir, "checkpoints", "4"))
    stat = os.statvfs(workdir)
    free = stat.f_bavail * stat.f_frsize
    with open(str(disk / "filler"), "wb") as f:
      f.write(b"\0" * max(0, free - one // 3))
    good = checkpoint.latest_params(workdir)[0]
    proc = subprocess.run(
        [sys.executable, "-m", "vit_jax.main", *TINY, "--config.total_steps=6",
         "--config.log_steps=0", f"--workdir={workdir}"], cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
        timeout=240)
    rc, out = proc.returncode, proc.stdout + proc.stderr
    assert rc == 1, out
    line = _error_line(out)
    assert "cannot write the checkpoint at step 6" in line, line
    assert "the checkpoint at step 4 is intact" in line, line
    assert len(out.splitlines()) < 20, out
    os.remove(str(disk / "filler"))
    # Step 4 reads back as it was written.
    assert 4 in _steps(workdir)
    restored = checkpoint.latest_params(workdir)[0]
    jax.tree.map(np.testing.assert_array_equal, restored, good)
  finally:
    subprocess.run(["umount", str(disk)], check=False)
