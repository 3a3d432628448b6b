"""`python -m vit_jax.sweep`: points, skip/resume, --point, --collect."""

import json
import os

import pytest

from vit_jax import sweep

from test_main import TINY  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP = '''
TINY = {tiny!r}

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
      metrics=["eval/accuracy", "eval/loss"])
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


def test_point_resume_collect(sweep_file, tmp_path, capsys):
  root = str(tmp_path / "root")
  args = ["sweep", f"--config={sweep_file}", f"--workdir={root}"]
  # One point, as a cluster job would run it.
  assert sweep.run(args + ["--point=2"]) == 0
  assert os.listdir(root) == ["gap_lr-3e-3_s0"]
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
