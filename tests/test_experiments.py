"""Every study in experiments/ lists points that `vit_jax.main` accepts.

Each sweep file (the CPU study and its paper-scale companion) is loaded, and
every setting's command line is parsed into a config, validated and turned
into a model, without training: a renamed field or a typo in an override
fails here rather than an hour into a sweep.
"""

import glob
import os

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
