"""`python -m vit_jax.sweep`: points, skip/resume, --point, --collect."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from vit_jax import metrics
from vit_jax import sweep

from test_main import TINY  # pylint: disable=g-bad-import-order
from test_train import _env, _finish  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP = '''
TINY = {tiny!r}

def report(rows, root):
  with open(root + "/report.txt", "w") as f:
    f.write(str(len(rows)))
  return "points reported: %d" % len(rows)

def get_sweep():
  base = dict(a.split("=", 1) for a in TINY[1:])
  base = {{k[len("--config."):]: v for k, v in base.items()}}
  base["checkpoint_steps"] = "2"
  return dict(
      settings=[
          dict(name="token", config="configs/digits.py:runlocal",
               overrides=base),
          dict(name="gap lr=3e-3", config="configs/digits.py:runlocal",
               overrides=dict(base, **{{"model.classifier": "gap",
                                        "optim.lr": 3e-3}})),
      ],
      seeds=(0, 1),
      metrics=["eval/accuracy", "eval/loss"],
      report=report)
'''


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / "sweep.py"
  path.write_text(SWEEP.format(tiny=TINY))
  return str(path)


def test_points_and_list(sweep_file, capsys):
  s = sweep.load_sweep(sweep_file)
  names = [p[0] for p in sweep.points(s)]
  assert names == ["token_s0", "token_s1", "gap_lr-3e-3_s0", "gap_lr-3e-3_s1"]
  assert sweep.run(["sweep", f"--config={sweep_file}", "--workdir=/tmp/x",
                    "--list"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 4 and out[2].startswith("2\tgap_lr-3e-3_s0")
  assert "--config.model.classifier=gap" in out[2]
  # --set adds an override to every point (and wins over the file's).
  assert sweep.run(["sweep", f"--config={sweep_file}", "--workdir=/tmp/x",
                    "--list", "--set=data_dir=/data", "--set=config.optim.lr=0.5"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert all("--config.data_dir=/data" in l and "--config.optim.lr=0.5" in l
             for l in out)


def test_point_resume_collect(sweep_file, tmp_path, capsys):
  root = str(tmp_path / "root")
  args = ["sweep", f"--config={sweep_file}", f"--workdir={root}"]
  # One point, as a cluster job would run it.
  assert sweep.run(args + ["--point=2"]) == 0
  assert sorted(os.listdir(root)) == [".jax_cache", "gap_lr-3e-3_s0"]
  done = json.load(open(os.path.join(root, "gap_lr-3e-3_s0", sweep.DONE)))
  assert done["seed"] == 0 and done["setting"] == "gap lr=3e-3"
  assert 0 <= done["metrics"]["eval/accuracy"] <= 1
  capsys.readouterr()
  # A point whose training ended without its done marker (killed before
  # writing it) is evaluated again, not retrained; finished ones skip. (A
  # point stopped mid-run: see the last test.)
  unmarked = os.path.join(root, "token_s1")
  assert sweep.run(args + ["--point=1"]) == 0
  os.remove(os.path.join(unmarked, sweep.DONE))
  assert sweep.run(args) == 0
  out = capsys.readouterr().out
  assert "gap_lr-3e-3_s0: done, skipped" in out
  assert "already trained for 4 steps" in out
  rows = [json.loads(l) for l in open(os.path.join(root, "results.jsonl"))]
  assert [r["point"] for r in rows] == [
      "token_s0", "token_s1", "gap_lr-3e-3_s0", "gap_lr-3e-3_s1"]
  table = open(os.path.join(root, "results.md")).read()
  assert "| token | 2 |" in table and "| gap lr=3e-3 | 2 |" in table
  # The table's numbers are the mean over seeds of the final metrics.
  acc = [r["metrics"]["eval/accuracy"] for r in rows[:2]]
  assert f"{100 * sum(acc) / 2:.1f} ±" in table
  # The sweep file's report() sees every finished point.
  assert "points reported: 4" in table
  assert open(os.path.join(root, "report.txt")).read() == "4"
  # --collect only gathers.
  assert sweep.run(args + ["--collect"]) == 0
  assert "| token | 2 |" in capsys.readouterr().out


def test_errors(tmp_path, capfd):
  assert sweep.run(["sweep", "--config=/no/such.py", f"--workdir={tmp_path}"]) == 1
  assert "sweep file /no/such.py not found" in capfd.readouterr().err
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return dict(settings=[])\n")
  assert sweep.run(["sweep", f"--config={bad}", f"--workdir={tmp_path}"]) == 1
  assert "lists no settings" in capfd.readouterr().err
  assert sweep.run(["sweep", f"--config={bad}", f"--workdir={tmp_path}",
                    "--set=oops"]) == 1
  assert "--set=oops is not KEY=VALUE" in capfd.readouterr().err


def test_root_and_seed_placeholders():
  """`{root}` and `{seed}` in override strings name an earlier point."""
  setting = dict(name="ft", config="configs/canvas.py",
                 overrides={"init": "{root}/pretrain_s{seed}",
                            "model.resnet": "{'num_layers': (1,)}"})
  args = sweep.argv(setting, 2, "/runs/ft_s2", "/runs")
  assert "--config.init=/runs/pretrain_s2" in args
  assert "--config.model.resnet={'num_layers': (1,)}" in args
  # "point" names the directory, e.g. another sweep's points under ROOT.
  shared = dict(setting, point="study/ft")
  assert [p[0] for p in sweep.points({"settings": [shared], "seeds": (0, 1)})] \
      == ["study/ft_s0", "study/ft_s1"]
  # `{root}` is the sweep's ROOT, also for a point in a subdirectory of it.
  assert "--config.init=/runs/pretrain_s0" in sweep.argv(
      shared, 0, "/runs/study/ft_s0", "/runs")


def test_a_stopped_point_is_not_done(tmp_path):
  """A run stopped by SIGTERM returns normally with a checkpoint; the sweep
  must not mark it done (it resumes on the next run)."""
  (tmp_path / "config.json").write_text(
      json.dumps({"resolved": {"total_steps": 5}}))
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 3}\n')
  assert not sweep._finished(str(tmp_path))  # pylint: disable=protected-access
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "eval/accuracy": 0.5}\n')
  assert sweep._finished(str(tmp_path))  # pylint: disable=protected-access
  assert not sweep._finished(str(tmp_path / "missing"))  # pylint: disable=protected-access


# Two settings of one config and seed: "stopped" is interrupted, "whole" is
# not. 12 steps with a checkpoint every 2 give the stop time to land.
STOPPED_SWEEP = """
TINY = {tiny!r}

def get_sweep():
  base = dict(a.split("=", 1) for a in TINY[1:])
  base = {{k[len("--config."):]: v for k, v in base.items()}}
  base.update(total_steps="12", checkpoint_steps="2")
  return dict(
      settings=[dict(name=name, config="configs/digits.py:runlocal",
                     overrides=base) for name in ("whole", "stopped")],
      seeds=(0,), metrics=["eval/accuracy", "eval/loss"])
"""


def _sweep(args, env):
  return subprocess.Popen(
      [sys.executable, "-m", "vit_jax.sweep", *args], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_point_stopped_mid_run_resumes_from_its_checkpoint(tmp_path):
  """SIGTERM after the first checkpoint of point `stopped_s0` (run alone with
  --point, on 2 devices) stops it with a checkpoint and no done marker; the
  next sweep trains `whole_s0`, resumes `stopped_s0` from that checkpoint
  and tabulates both. One config, one seed, one device count: the two
  points' losses, gradient norms and final metrics are bitwise equal."""
  sweep_file = tmp_path / "sweep.py"
  sweep_file.write_text(STOPPED_SWEEP.format(tiny=TINY))
  root = str(tmp_path / "root")
  args = [f"--config={sweep_file}", f"--workdir={root}"]
  stopped = os.path.join(root, "stopped_s0")
  proc = _sweep(args + ["--point=1"], _env(2))
  ckpts = os.path.join(stopped, "checkpoints")
  deadline = time.time() + 180
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts)):
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  rc, out = _finish(proc)
  assert rc == 1, out[-3000:]
  assert "error: point stopped_s0 stopped before its last step; run the " \
      "sweep again to resume it" in out, out[-3000:]
  assert "Traceback" not in out
  stop_step = int(re.search(r"stopped by SIGTERM at step (\d+);", out)[1])
  assert 2 <= stop_step < 12
  assert not os.path.exists(os.path.join(stopped, sweep.DONE))

  rc, out = _finish(_sweep(args, _env(2)))
  assert rc == 0, out[-3000:]
  assert "whole_s0: finished in" in out and "stopped_s0: finished in" in out
  assert f"resumed from the checkpoint at step {stop_step}" in out, out[-3000:]
  assert out.count("resumed from the checkpoint") == 1  # whole_s0 is fresh.
  rows = {p: [r for r in metrics.read_jsonl(os.path.join(root, p))
              if "train/loss" in r]
          for p in ("whole_s0", "stopped_s0")}
  assert [r["step"] for r in rows["stopped_s0"]] == list(range(1, 13))
  for key in ("train/loss", "train/grad_norm"):
    assert ([r[key] for r in rows["stopped_s0"]] ==
            [r[key] for r in rows["whole_s0"]]), key
  results = [json.loads(l) for l in open(os.path.join(root,
                                                      "results.jsonl"))]
  assert [r["point"] for r in results] == ["whole_s0", "stopped_s0"]
  for key in ("eval/accuracy", "eval/loss"):
    assert results[0]["metrics"][key] == results[1]["metrics"][key], key
  table = open(os.path.join(root, "results.md")).read()
  cells = [l.split(" | ", 2)[2] for l in table.splitlines()
           if l.startswith(("| whole |", "| stopped |"))]
  assert len(cells) == 2 and cells[0] == cells[1] and "–" not in cells[0]
