"""`python -m vit_jax.sweep`: points, skip/resume, --point, --collect."""

import json
import os

import pytest

from vit_jax import sweep

from test_main import TINY  # pylint: disable=g-bad-import-order

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
  # A point killed after its first checkpoint resumes; finished ones skip.
  killed = os.path.join(root, "token_s1")
  assert sweep.run(args + ["--point=1"]) == 0
  os.remove(os.path.join(killed, sweep.DONE))
  assert sweep.run(args) == 0
  out = capsys.readouterr().out
  assert "gap_lr-3e-3_s0: done, skipped" in out
  assert "already trained for 4 steps" in out  # token_s1 resumed at the end.
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
