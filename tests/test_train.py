"""End-to-end runs of `python -m vit_jax.main` in subprocesses.

- two processes (gloo, 4 simulated devices each) match one 8-device process;
- a run SIGKILLed after a checkpoint and restarted ends bitwise equal to an
  uninterrupted one;
- SIGTERM saves a checkpoint and exits cleanly, with config.json,
  metrics.jsonl and TensorBoard events in the workdir.
"""

import glob
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest

from vit_jax import checkpoint
from vit_jax import metrics
from vit_jax import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_sharding import losses, tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The command-line equivalent of `tiny_config()`.
TINY = [
    "--config=configs/digits.py:runlocal", "--config.total_steps=3",
    "--config.log_steps=1", "--config.evals.eval.every=0",
    "--config.checkpoint_steps=0", "--config.evals.fewshot.every=-1",
    "--config.progress=False", "--config.batch_size=16",
    "--config.eval_batch_size=120", "--config.image_size=(8, 8)",
    "--config.model.hidden_size=16", "--config.model.mlp_dim=32",
    "--config.model.num_heads=4", "--config.model.num_layers=1",
    "--config.model.patch_size=4",
]


def _env(devices, cache_dir=None, **extra):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + conftest.COLLECTIVE_TIMEOUTS,
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
  if cache_dir:  # Runs of the same config compile once.
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _main(args, env, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-m", "vit_jax.main", *args], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _finish(proc, timeout=240):
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"timed out:\n{out[-3000:]}")
  return proc.returncode, out


def test_two_processes_match_one_process(tmp_path):
  port = portpicker.pick_unused_port()
  workdir = str(tmp_path / "multi")
  procs = [
      _main(TINY + [f"--workdir={workdir}"], _env(
          4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
          JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
      for i in range(2)]
  # Meanwhile, the single-process reference on this process's 8 devices.
  reference_dir = str(tmp_path / "single")
  assert len(jax.devices()) == 8
  train.train_and_evaluate(tiny_config(), reference_dir)
  for proc in procs:
    rc, out = _finish(proc)
    assert rc == 0, out[-3000:]
  got, want = losses(workdir), losses(reference_dir)
  assert len(got) == len(want) == 3
  np.testing.assert_allclose(got, want, rtol=1e-5)
  rows = metrics.read_jsonl(workdir)
  assert [r["eval/num_examples"] for r in rows if "eval/accuracy" in r] == [
      360]
  # Both processes wrote one checkpoint together.
  params, _ = checkpoint.latest_params(workdir)
  ref_params, _ = checkpoint.latest_params(reference_dir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


def _kill_after_first_checkpoint(proc, workdir, timeout=180):
  """SIGKILLs `proc` as soon as a committed checkpoint shows in `workdir`."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(d.isdigit()
                                       for d in os.listdir(ckpt_dir)):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  return _finish(proc)


def sigkill_and_resume(tmp_path, args, total_steps):
  """Runs `args` whole and killed + resumed; returns the two workdirs.

  Asserts that the kill happened before the end, that the second run
  resumed, and that the final parameters and the losses logged after the
  resumed step are bitwise equal.
  """
  cache = tmp_path / "cache"
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  rc, out = _finish(_main(args + [f"--workdir={full}"], _env(8, cache)))
  assert rc == 0, out[-3000:]
  rc, out = _kill_after_first_checkpoint(
      _main(args + [f"--workdir={killed}"], _env(8, cache)), killed)
  assert rc == -signal.SIGKILL, out[-3000:]
  rc, out = _finish(_main(args + [f"--workdir={killed}"], _env(8, cache)))
  assert rc == 0, out[-3000:]
  resumed = [int(line.rsplit(" ", 1)[1]) for line in out.splitlines()
             if line.startswith("resumed from the checkpoint at step")]
  assert len(resumed) == 1 and resumed[0] < total_steps, out[-3000:]
  a, _ = checkpoint.latest_params(full)
  b, _ = checkpoint.latest_params(killed)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  # The resumed run logged the same losses for the steps after the kill.
  la = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(full)
        if "train/loss" in r}
  lb = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(killed)
        if "train/loss" in r}
  after = [s for s in la if s > resumed[0]]
  assert after and all(la[s] == lb[s] for s in after)
  return full, killed


def test_sigkill_and_resume_is_bitwise_equal(tmp_path):
  sigkill_and_resume(
      tmp_path, TINY + ["--config.total_steps=40",
                        "--config.checkpoint_steps=2"], 40)


# SimMIM on digits, tiny: 16x16 images, 4 px patches and mask cells.
TINY_MIM = [
    "--config=configs/simmim.py:digits,runlocal", "--config.log_steps=1",
    "--config.progress=False", "--config.batch_size=16",
    "--config.evals.reconstruction.every=-1",
    "--config.evals.fewshot.every=-1", "--config.model.hidden_size=16",
    "--config.model.mlp_dim=32", "--config.model.num_heads=4",
    "--config.model.num_layers=1", "--config.model.patch_size=4",
]


def test_simmim_sigkill_resume_and_fine_tuning_init(tmp_path):
  full, _ = sigkill_and_resume(
      tmp_path, TINY_MIM + ["--config.total_steps=40",
                            "--config.checkpoint_steps=2"], 40)
  # Fine-tuning for classification from the MIM workdir.
  args = [a for a in TINY if "image_size" not in a]
  rc, out = _finish(_main(
      args + ["--config.image_size=(16, 16)", f"--config.init={full}",
              f"--workdir={tmp_path / 'ft'}"], _env(8)))
  assert rc == 0, out[-3000:]
  assert ("init: dropped the masked-image-modeling decoder and mask token "
          "(decoder/bias, decoder/kernel, mask_token)") in out
  assert "kept the random initialisation" not in out
  assert "ignored" not in out


def test_sigterm_saves_checkpoint_and_exits(tmp_path):
  workdir = str(tmp_path / "run")
  args = TINY + ["--config.total_steps=100000", "--config.log_steps=1",
                 f"--workdir={workdir}"]
  proc = _main(args, _env(8))
  jsonl = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(jsonl) and len(metrics.read_jsonl(workdir)) >= 2:
      break
    time.sleep(0.5)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  rc, out = _finish(proc)
  assert rc == 0, out[-3000:]
  assert "stopped by SIGTERM" in out
  assert "Traceback" not in out
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(steps) == 1 and steps[0] >= 2
  logged = max(r["step"] for r in metrics.read_jsonl(workdir))
  assert steps[0] == logged
  params, config = checkpoint.latest_params(workdir)
  assert config.resolved.num_classes == 10
  assert params["head"]["kernel"].shape == (16, 10)
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))


def _interrupt_after_new_rows(proc, workdir, rows, signum, timeout=180):
  """Sends `signum` once metrics.jsonl holds `rows` more training rows than
  when called; returns (exit status, output)."""
  jsonl = os.path.join(workdir, "metrics.jsonl")

  def count():
    if not os.path.exists(jsonl):
      return 0
    return len([r for r in metrics.read_jsonl(workdir) if "train/loss" in r])

  before = count()
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if count() >= before + rows:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signum)
  return _finish(proc)


def test_sigint_saves_checkpoint_and_resume_continues(tmp_path):
  """Ctrl-C as SIGTERM: a checkpoint at the step reached, exit 0; the same
  command resumes from it and goes on."""
  workdir = str(tmp_path / "run")
  args = TINY + ["--config.total_steps=100000", f"--workdir={workdir}"]
  env = _env(8, tmp_path / "cache")
  rc, out = _interrupt_after_new_rows(_main(args, env), workdir, 2,
                                      signal.SIGINT)
  assert rc == 0, out[-3000:]
  assert "stopped by SIGINT" in out and "Traceback" not in out
  first = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(first) == 1 and first[0] >= 2
  rc, out = _interrupt_after_new_rows(_main(args, env), workdir, 1,
                                      signal.SIGINT)
  assert rc == 0, out[-3000:]
  assert f"resumed from the checkpoint at step {first[0]}" in out
  assert "stopped by SIGINT" in out
  steps = sorted(int(s) for s in os.listdir(
      os.path.join(workdir, "checkpoints")))
  assert steps[-1] > first[0]
  logged = [r["step"] for r in metrics.read_jsonl(workdir)
            if "train/loss" in r]
  assert logged[:first[0]] == list(range(1, first[0] + 1))
  assert logged[-1] == steps[-1]


def test_distributed_flag(tmp_path):
  """--distributed calls jax.distributed.initialize: without a coordinator
  that is one error line; with one (a single process on localhost) the run
  trains as usual."""
  plain = _env(8)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
               "JAX_PROCESS_ID"):
    plain.pop(name, None)
  workdir = str(tmp_path / "run")
  rc, out = _finish(_main(TINY + ["--distributed", f"--workdir={workdir}"],
                          plain))
  assert rc == 1, out[-3000:]
  lines = [l for l in out.splitlines() if l.strip()]
  assert lines[-1].startswith("error: cannot join a multi-process run"), out
  assert "JAX_COORDINATOR_ADDRESS" in lines[-1] and "Traceback" not in out
  port = portpicker.pick_unused_port()
  rc, out = _finish(_main(TINY + ["--distributed", f"--workdir={workdir}"],
                          _env(8, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                               JAX_NUM_PROCESSES="1", JAX_PROCESS_ID="0")))
  assert rc == 0, out[-3000:]
  assert [r["step"] for r in metrics.read_jsonl(workdir)
          if "train/loss" in r] == [1, 2, 3]


def test_second_run_loads_programs_from_the_compilation_cache(tmp_path):
  cache = str(tmp_path / "cache")
  loaded = []
  for i in range(2):
    rc, out = _finish(_main(
        TINY + [f"--compilation_cache={cache}",
                f"--workdir={tmp_path / str(i)}"], _env(8)))
    assert rc == 0, out[-3000:]
    times = [l for l in out.splitlines() if l.startswith("time: ")]
    assert len(times) == 1, out[-3000:]
    found = re.search(r", loaded (\d+) from the compilation cache in ",
                      times[0])
    loaded.append(int(found.group(1)) if found else 0)
  assert loaded[0] == 0 and loaded[1] > 0, loaded
