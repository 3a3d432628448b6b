"""`python -m vit_jax.bench pipeline` at a tiny size."""

import json

import pytest

from vit_jax.bench import __main__ as bench

# A config with a tiny model: compiling its step is quick.
TINY_CONFIG = """
from vit_jax import config_utils


def get_config():
  c = config_utils.default_config()
  c.dataset, c.train_split = "digits", "train"
  c.image_size, c.batch_size = (8, 8), 16
  c.model_name = "testing"
  c.model.update(dict(patch_size=4, hidden_size=8, num_layers=1, num_heads=2,
                      mlp_dim=8))
  return c
"""


def test_pipeline_bench_measures_a_folder_beside_the_step(capsys, tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  assert bench.main([
      "bench", "pipeline", f"--config={config}", "--datasets=folder",
      "--folder_images=24", "--folder_size=12", "--batches=1", "--steps=1",
      "--repeats=1", "--json"]) == 0
  result = json.loads(capsys.readouterr().out)  # stdout is the JSON only.
  assert result["setup"]["batch_size"] == 16
  folder = result["datasets"]["folder"]
  assert folder["dataset"] == "folder" and folder["images"] == 24
  assert folder["image_shape"] == [12, 12, 3] and not folder["in_memory"]
  for key in ("decode_us_per_image", "augment_us_per_image",
              "pipeline_first_epoch_images_per_second",
              "pipeline_images_per_second", "step_images_per_second"):
    assert folder[key] > 0, key
  assert folder["ratio"] == pytest.approx(
      folder["pipeline_images_per_second"] / folder["step_images_per_second"])


@pytest.mark.parametrize("args, message", [
    (["--datasets=folder,mnist"], "--datasets takes config, folder"),
    (["--config=configs/absent.py"], "config file configs/absent.py not found"),
])
def test_pipeline_bench_bad_input_is_one_error_line(args, message, capsys):
  assert bench.main(["bench", "pipeline", *args]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err, err
  assert len(err.strip().splitlines()) == 1
