"""Every study in experiments/ lists points that `vit_jax.main` accepts, and
commits the points its README reports.

Each sweep file (the CPU study and its paper-scale companion) is loaded, and
every setting's command line is parsed into a config, validated and turned
into a model, without training: a renamed field or a typo in an override
fails here rather than an hour into a sweep. Each study's results.jsonl
holds every point with the machine it ran on, and the README's table is
computed from those rows.
"""

import glob
import importlib.util
import json
import os
import re

import pytest

from vit_jax import config_utils
from vit_jax import main
from vit_jax import models
from vit_jax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*", "*.py")))
SWEEPS = [f for f in FILES if os.path.basename(f) in ("sweep.py", "paper.py")]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def test_every_study_has_a_sweep_and_a_paper_scale_sweep():
  studies = {os.path.basename(os.path.dirname(f)) for f in SWEEPS}
  for study in ("posemb", "cls_vs_gap", "data_size", "hires_finetune",
                "fewshot_vs_finetune"):
    assert study in studies
    assert os.path.exists(os.path.join(ROOT, "experiments", study,
                                       "README.md")), study


@pytest.mark.parametrize("path", SWEEPS,
                         ids=[os.path.relpath(f, ROOT) for f in SWEEPS])
def test_points_parse_into_valid_configs_and_models(path):
  s = sweep.load_sweep(path)
  assert len(s["seeds"]) >= (3 if path.endswith("sweep.py") else 1)
  for setting in s["settings"]:
    args = sweep.argv(setting, s["seeds"][0], "/tmp/unused/point",
                      "/tmp/unused")
    assert main._parse(args) is None, (setting["name"], args)  # pylint: disable=protected-access
    config = main._CONFIG.value  # pylint: disable=protected-access
    config_utils.validate(config)
    kwargs = dict(config_utils.model_kwargs(config), num_classes=10,
                  image_size=tuple(config.image_size))
    model = models.create(config.model_name, **kwargs)
    assert model.grid_size(tuple(config.image_size))


def test_canvas_runlocal_trains_and_reports_both_metrics(tmp_path):
  """The studies' base config runs end to end (BiT and hybrid: their configs
  are built above; test_bit trains a BiT through main)."""
  from vit_jax import metrics  # pylint: disable=g-import-not-at-top
  args = ["main", "--config=configs/canvas.py:runlocal",
          f"--workdir={tmp_path}", "--config.progress=False"]
  assert main.run(args) == 0
  final = sweep.final_metrics(str(tmp_path))
  assert 0 <= final["eval/accuracy"] <= 1
  assert 0 <= final["fewshot/canvas/10shot"] <= 1
  assert max(r["step"] for r in metrics.read_jsonl(str(tmp_path))) == 10


# Studies whose README table is the sweep's table of their committed points.
TABLED = ("posemb", "cls_vs_gap", "data_size", "hires_finetune")
CELL = re.compile(r"^-?[\d.]+ ± [\d.]+( \(1 seed\))?$")


def _rows(study):
  path = os.path.join(ROOT, "experiments", study, "results.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _readme_table(study):
  """{first cell: [cells...]} of the README's table rows (bold dropped)."""
  with open(os.path.join(ROOT, "experiments", study, "README.md")) as f:
    lines = [l.strip() for l in f if l.startswith("| ")]
  table = {}
  for line in lines:
    cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
    table.setdefault(cells[0], cells[1:])  # The first table of the README.
  return table


def _check_environment(row, where):
  env = row.get("environment") or {}
  assert env.get("cpu") and env.get("packages", {}).get("jax"), where


@pytest.mark.parametrize("study", TABLED + ("fewshot_vs_finetune",))
def test_each_study_commits_every_point_with_its_environment(study):
  """results.jsonl holds one row per point of the study's sweep, each with
  its final metrics and the machine and package versions it ran on."""
  s = sweep.load_sweep(os.path.join(ROOT, "experiments", study, "sweep.py"))
  rows = _rows(study)
  assert sorted(r["point"] for r in rows) == sorted(
      name for name, _, _ in sweep.points(s))
  for row in rows:
    _check_environment(row, row["point"])
    assert all(k in row["metrics"] for k in s["metrics"]), row["point"]


@pytest.mark.parametrize("study", TABLED)
def test_each_study_table_is_its_committed_points(study):
  """Every cell of the README's table is the mean ± std over the seeds of
  the committed points (as `vit_jax.sweep` formats it)."""
  s = sweep.load_sweep(os.path.join(ROOT, "experiments", study, "sweep.py"))
  rows = _rows(study)
  table = _readme_table(study)
  for setting in s["settings"]:
    mine = [r for r in rows if r["setting"] == setting["name"]]
    expected = [str(len(mine))] + [
        sweep.format_cell(*sweep.mean_std(
            [float(r["metrics"][k]) for r in mine]), len(mine))
        for k in s["metrics"]]
    assert table.get(setting["name"]) == expected, setting["name"]
    assert all(CELL.match(c) for c in expected[1:])


def test_simmim_study_table_is_its_committed_seeds():
  """The SimMIM study's table is its script's table of the committed rows."""
  spec = importlib.util.spec_from_file_location(
      "simmim_run", os.path.join(ROOT, "experiments", "simmim_digits",
                                 "run.py"))
  run_py = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run_py)
  rows = _rows("simmim_digits")
  assert sorted(r["seed"] for r in rows) == [0, 1, 2]
  for row in rows:
    _check_environment(row, row["seed"])
  results = {str(r["seed"]): r for r in rows}
  table = _readme_table("simmim_digits")
  for line in run_py.table(results).splitlines()[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert table.get(cells[0]) == cells[1:], cells[0]


def test_fewshot_study_table_is_its_committed_results():
  """The few-shot study's leave-one-out table is its committed JSONs'."""
  base = os.path.join(ROOT, "experiments", "fewshot_digits")
  table = _readme_table("fewshot_digits")
  names = {"pixels (floor)": "pixels", "random-init ViT `pre_logits`":
           "random_init", "trained ViT `pre_logits`": "pre_logits"}
  for name, folder in names.items():
    paths = glob.glob(os.path.join(base, folder, "fewshot_*.json"))
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
      document = json.load(f)
    _check_environment(document, paths[0])
    digits = document["results"]["digits"]
    expected = [f"{digits[n]['mean'] * 100:.1f} ± {digits[n]['std'] * 100:.1f}"
                for n in ("1", "5", "10", "25")]
    assert table[name] == expected, name
