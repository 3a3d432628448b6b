"""End-to-end runs of `python -m vit_jax.main` in subprocesses.

- two processes (gloo, 4 simulated devices each) match one 8-device process;
- a run SIGKILLed three times (once during a checkpoint write) and resumed
  each time ends bitwise equal to an uninterrupted one, with the same
  metrics.jsonl rows;
- a run on a 2 x 2 mesh stopped after a checkpoint resumes on 2 devices,
  data parallel, and ends where the uninterrupted run does, within float
  tolerance;
- SIGTERM saves a checkpoint and exits cleanly, with config.json,
  metrics.jsonl and TensorBoard events in the workdir.
"""

import glob
import json
import os
import re
import shutil
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
from test_sharding import assert_states_close, final_state, losses, tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def _listing(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []


def _committed(workdir):
  return {int(d) for d in _listing(workdir) if d.isdigit()}


def _writing(workdir):
  """Steps whose checkpoint is being written (orbax's temporary
  directories)."""
  return {int(d.split(".")[0]) for d in _listing(workdir)
          if "orbax-checkpoint-tmp" in d}


def _kill_when(proc, condition, delay=0.0, timeout=180):
  """SIGKILLs `proc` `delay` s after `condition()` first holds; returns
  (exit status, output)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.002)
  return _finish(proc)


def sigkill_and_resume(tmp_path, args, total_steps, kills=1, seed=0):
  """Runs `args` whole, and again SIGKILLed `kills` times and resumed.

  The first kill lands a random moment after the first committed
  checkpoint; with several kills, one lands while a checkpoint is being
  written (a step directory still orbax's temporary one when the process
  dies), the others a random moment after a newer checkpoint than the one
  resumed from. Asserts that every kill landed before the end, that each
  run after one resumed, that every state leaf of the final checkpoint is
  bitwise equal to the uninterrupted run's, and that metrics.jsonl holds
  the same rows in the same order (timings aside).

  Returns:
    The two workdirs (uninterrupted, killed).
  """
  rng = np.random.default_rng(seed)
  cache = tmp_path / "cache"
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  rc, out = _finish(_main(args + [f"--workdir={full}"], _env(8, cache)))
  assert rc == 0, out[-3000:]
  resumed, mid_write = [], False
  for k in range(kills):
    proc = _main(args + [f"--workdir={killed}"], _env(8, cache))
    base = max(_committed(killed), default=0)
    if k == 0:
      condition = lambda: bool(_committed(killed))  # pylint: disable=cell-var-from-loop
      delay = rng.uniform(0, 0.1)
    elif not mid_write:
      # The killed run may have left the temporary directory of step
      # base + 1; this run's own writes start there too, so wait for a
      # later one.
      condition = lambda: max(_writing(killed), default=0) > base + 1  # pylint: disable=cell-var-from-loop
      delay = 0.0
    else:
      condition = lambda: max(_committed(killed), default=0) > base  # pylint: disable=cell-var-from-loop
      delay = rng.uniform(0, 0.1)
    rc, out = _kill_when(proc, condition, delay)
    assert rc == -signal.SIGKILL, out[-3000:]
    if k and not mid_write:
      # Killed during the write if orbax's temporary directory stayed.
      mid_write = max(_writing(killed), default=0) > base + 1
    resumed += [int(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                if line.startswith("resumed from the checkpoint at step")]
  rc, out = _finish(_main(args + [f"--workdir={killed}"], _env(8, cache)))
  assert rc == 0, out[-3000:]
  resumed += [int(line.rsplit(" ", 1)[1]) for line in out.splitlines()
              if line.startswith("resumed from the checkpoint at step")]
  assert len(resumed) == kills and max(resumed) < total_steps, resumed
  if kills > 1:
    assert mid_write, "no kill landed during a checkpoint write"
  a, _ = checkpoint.latest_params(full)
  b, _ = checkpoint.latest_params(killed)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=str(path))
  # The same rows, in the same order, with the same values (bit for bit:
  # the same computation on the same 8 devices); timings differ.
  def rows(workdir):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in metrics.read_jsonl(workdir)]
  assert rows(killed) == rows(full)
  return full, killed


def test_three_sigkills_and_resumes_are_bitwise_equal(tmp_path):
  # A checkpoint every step: most moments of the run are during a write.
  sigkill_and_resume(
      tmp_path, TINY + ["--config.total_steps=24",
                        "--config.checkpoint_steps=1"], 24, kills=3)


def test_resume_on_another_device_count_and_mesh(tmp_path):
  """A run on 4 devices as a 2 x 2 mesh (model parallel, FSDP) stopped after
  its checkpoint at step 4 finishes on 2 devices (data parallel only) where
  the uninterrupted run ends.

  The stopped run is the uninterrupted run's workdir as it stood after step
  4: its checkpoint at step 4 (the state a run stopped there saves: the same
  computation) and its rows up to step 4. Sums over other devices round
  differently: the losses and gradient norms of steps 5-8 agree within 1e-5
  relative, the final state within 1e-4 of each tree's largest magnitude
  (`assert_states_close`).
  """
  args = [a for a in TINY if not a.startswith((
      "--config.total_steps", "--config.checkpoint_steps",
      "--config.evals.eval.every"))]
  args += ["--config.total_steps=8", "--config.checkpoint_steps=4",
           "--config.evals.eval.every=-1"]
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  rc, out = _finish(_main(
      args + ["--config.mesh=(('data', 2), ('model', 2))", "--config.fsdp=True",
              "--config.fsdp_min_size=64", f"--workdir={full}"], _env(4)))
  assert rc == 0, out[-3000:]
  step, want = final_state(full)
  assert step == 8
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in metrics.read_jsonl(full)
                 if r["step"] <= 4)
  rc, out = _finish(_main(args + [f"--workdir={resumed}"], _env(2)))
  assert rc == 0, out[-3000:]
  assert "resumed from the checkpoint at step 4" in out, out[-3000:]
  assert [r["step"] for r in metrics.read_jsonl(resumed)
          if "train/loss" in r] == list(range(1, 9))  # Steps 1-4 not rerun.
  for key in ("train/loss", "train/grad_norm"):
    got, ref = losses(resumed, key), losses(full, key)
    assert len(got) == len(ref) == 8
    np.testing.assert_allclose(got[4:], ref[4:], rtol=1e-5, err_msg=key)
  step, got = final_state(resumed)
  assert step == 8
  assert_states_close(got, want)


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
      tmp_path, TINY_MIM + ["--config.total_steps=12",
                            "--config.checkpoint_steps=2"], 12)
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
  # The run's last lines: where it stopped, the checkpoint, how to resume.
  block = out[out.index("stopped by SIGTERM"):].splitlines()
  assert block[0] == (f"stopped by SIGTERM at step {logged}; checkpoint "
                      f"saved, {100000 - logged} of 100000 steps to go")
  assert block[1].split() == [
      "checkpoint", os.path.join(workdir, "checkpoints", str(logged))]
  assert block[2].split()[0] == "resume" and block[2].endswith(
      f"run the same command again: it goes on from step {logged}")
  assert [l.split()[0] for l in block[3:]] == ["time", "XLA"]
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
    times = [l for l in out.splitlines() if l.startswith("  XLA ")]
    assert len(times) == 1, out[-3000:]
    found = re.search(r", loaded (\d+) from the compilation cache in ",
                      times[0])
    loaded.append(int(found.group(1)) if found else 0)
  assert loaded[0] == 0 and loaded[1] > 0, loaded
