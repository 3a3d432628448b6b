"""Training curves: DIR/curves.png from training, a sweep and `analyze`."""

import contextlib
import io
import json
import os

import PIL.Image
import pytest

from vit_jax import analyze
from vit_jax import errors
from vit_jax import metrics
from vit_jax import sweep
from vit_jax.analysis import curves

from test_cli_errors import one_error_line  # pylint: disable=g-bad-import-order
from test_main import TINY  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two seeds of TINY (4 steps, a row per step), evaluated at steps 2 and 4.
SWEEP = '''
TINY = {tiny!r}

def get_sweep():
  base = dict(a.split("=", 1) for a in TINY[1:])
  base = {{k[len("--config."):]: v for k, v in base.items()}}
  base["evals.eval.every"] = "2"
  return dict(settings=[dict(name="tiny", config={config!r},
                             overrides=base)],
              seeds=(0, 1))
'''


def _png(path):
  """(width, height) of a PNG that PIL reads whole."""
  with PIL.Image.open(path) as image:
    assert image.format == "PNG" and image.mode == "RGBA"
    image.load()
    assert min(image.size) > 100
    return image.size


def _leftovers(directory):
  return [n for n in os.listdir(directory) if n.endswith(".tmp")]


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
  """(ROOT, printed): a sweep of two trained points, tiny_s0 and tiny_s1;
  tiny_s1's curves.png could not be written (a directory holds its name)."""
  root = tmp_path_factory.mktemp("curves")
  sweep_file = root / "sweep.py"
  sweep_file.write_text(SWEEP.format(
      tiny=TINY, config=os.path.join(ROOT, "configs/digits.py:runlocal")))
  out = root / "root"
  (out / "tiny_s1" / "curves.png").mkdir(parents=True)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    assert sweep.run(["sweep", f"--config={sweep_file}",
                      f"--workdir={out}"]) == 0
  return str(out), printed.getvalue()


def test_training_and_sweep_write_curves(sweep_root):
  """Training left DIR/curves.png, the sweep ROOT/curves.png (wider: the
  runs' legend sits beside the panels); no temporary file is left behind."""
  root, _ = sweep_root
  workdir = os.path.join(root, "tiny_s0")
  single = _png(os.path.join(workdir, "curves.png"))
  assert not _leftovers(workdir)
  overlay = _png(os.path.join(root, "curves.png"))
  assert overlay[0] > single[0]
  assert not _leftovers(root)


def test_a_plotting_failure_does_not_stop_training(sweep_root):
  """Where curves.png cannot be written each evaluation warns in one line
  and training goes on to the end."""
  root, printed = sweep_root
  workdir = os.path.join(root, "tiny_s1")
  warnings = [l for l in printed.splitlines() if "curves.png" in l
              and not l.startswith("  curves ")]  # The summary's row.
  assert len(warnings) == 2, printed  # Evaluations at steps 2 and 4.
  assert all(l.startswith(f"warning: could not draw {workdir}/curves.png: ")
             for l in warnings), warnings
  # The run's summary names no curves.png that it could not write.
  assert f"curves      {workdir}/curves.png" not in printed
  assert "Traceback" not in printed
  assert os.path.exists(os.path.join(workdir, sweep.DONE))
  assert max(r["step"] for r in metrics.read_jsonl(workdir)) == 4
  assert not _leftovers(workdir)


def test_analyze_draws_one_two_or_a_sweep_root(sweep_root, tmp_path, capsys):
  root, _ = sweep_root
  one = os.path.join(root, "tiny_s1")
  two = f"{os.path.join(root, 'tiny_s0')},{one}"
  for workdir, name, shown in [
      (one, "one", "curves of tiny_s1: train/loss, train/lr, eval/accuracy, "
                   "eval/loss;"),
      (two, "two", "curves of tiny_s0, tiny_s1: "),
      (root, "root", "curves of tiny_s0, tiny_s1: ")]:
    out = str(tmp_path / name)
    assert analyze.run(["analyze", f"--workdir={workdir}", "--what=curves",
                        f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert shown in printed and os.path.join(out, "curves.png") in printed
    _png(os.path.join(out, "curves.png"))
  # The default for a workdir: the checkpoint's analyses and its curves.
  out = str(tmp_path / "all")
  assert analyze.run(["analyze", f"--workdir={one}", "--num_images=2",
                      "--num_show=1", f"--output_dir={out}"]) == 0
  assert {"attention_distance.png", "posemb_similarity.png", "rollout.png",
          "filters.png", "curves.png"} <= set(os.listdir(out))


def _write_rows(workdir, rows):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


ROWS = [
    {"step": 0, "data/skipped_images": 0, "eval/skipped_images": 0},
    {"step": 1, "train/loss": 2.0, "train/lr": 0.1, "train/grad_norm": 1.0,
     "perf/img_per_sec": 100.0},
    {"step": 2, "train/loss": "nan", "train/lr": 0.05},
    {"step": 2, "eval/accuracy": 0.5, "eval/loss": "inf",
     "eval/num_correct": 5.0, "ema/eval/accuracy": 0.6,
     "fewshot/d/5shot": 0.4, "fewshot/d/5shot_std": 0.01,
     "fewshot/d/5shot_l2": 1.0, "fewshot/d/10shot": 0.45},
    {"step": 3, "train/loss": 0.1},
]


def test_series_panels_and_colour_groups(tmp_path):
  _write_rows(tmp_path / "a", ROWS)
  series = curves.read_series(str(tmp_path / "a"))
  assert series == {
      "train/loss": ([1, 3], [2.0, 0.1]), "train/lr": ([1, 2], [0.1, 0.05]),
      "eval/accuracy": ([2], [0.5]), "ema/eval/accuracy": ([2], [0.6]),
      "fewshot/d/5shot": ([2], [0.4]), "fewshot/d/10shot": ([2], [0.45])}
  # One run: the shot counts share a panel; several: a panel per shot count.
  path = str(tmp_path / "one.png")
  assert curves.plot([("a", series)], path) == [
      "train/loss", "train/lr", "eval/accuracy", "fewshot/d"]
  _png(path)
  path = str(tmp_path / "two.png")
  assert curves.plot([("a", series), ("b", series)], path) == [
      "train/loss", "train/lr", "eval/accuracy", "fewshot/d/5shot",
      "fewshot/d/10shot"]
  _png(path)
  # Nothing to draw yet: a figure that says so.
  _write_rows(tmp_path / "new", ROWS[:1])
  path = str(tmp_path / "new.png")
  assert curves.write([("new", str(tmp_path / "new"))], path) == []
  _png(path)
  # A sweep's points share their setting's colour; other names their own.
  assert curves.groups_of(["a_s0", "a_s1", "b_s0", "b_s1"]) == [
      "a", "a", "b", "b"]
  assert curves.groups_of(["a_s0", "b_s0"]) == ["a_s0", "b_s0"]
  assert curves.groups_of(["x", "x_s1"]) == ["x", "x_s1"]


def test_a_broken_metrics_file_is_a_warning_or_an_error_line(tmp_path, capfd):
  _write_rows(tmp_path, ROWS)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')  # Cut short by a kill.
  logged = []
  assert not curves.write_safely(str(tmp_path), log=logged.append)
  assert len(logged) == 1 and logged[0].startswith("warning: could not draw")
  assert not os.path.exists(tmp_path / "curves.png")
  with pytest.raises(errors.Error, match="resuming the run repairs it"):
    curves.read_series(str(tmp_path))
  line = one_error_line(analyze.run(
      ["analyze", f"--workdir={tmp_path}", "--what=curves"]), capfd)
  assert "is not JSON" in line


def test_curves_need_only_metrics_and_say_what_is_missing(tmp_path, capfd):
  # Workdirs of metrics.jsonl alone (no config.json, no checkpoint).
  _write_rows(tmp_path / "a", ROWS)
  _write_rows(tmp_path / "b", ROWS)
  assert analyze.run(["analyze", f"--workdir={tmp_path / 'a'}",
                      "--what=curves"]) == 0
  assert "eval/accuracy, fewshot/d; wrote" in capfd.readouterr().out
  _png(tmp_path / "a" / "curves.png")
  empty = tmp_path / "empty"
  empty.mkdir()
  line = one_error_line(analyze.run(
      ["analyze", f"--workdir={empty}", "--what=curves"]), capfd)
  assert f"{empty} has no metrics.jsonl" in line and "--workdir" in line
  both = f"--workdir={tmp_path / 'a'},{tmp_path / 'b'}"
  line = one_error_line(analyze.run(["analyze", both, "--what=curves"]), capfd)
  assert "pass --output_dir=DIR" in line
  line = one_error_line(analyze.run(
      ["analyze", both, "--what=curves,posemb", f"--output_dir={tmp_path}"]),
                        capfd)
  assert "--what=posemb analyses one checkpoint" in line
  line = one_error_line(analyze.run(
      ["analyze", f"--init={tmp_path}/x.npz", "--model=testing",
       "--what=curves"]), capfd)
  assert "pass --workdir=DIR instead of --init" in line
