"""`python -m vit_jax.bench --fewshot` at a tiny size: runs and agrees."""

import json

from vit_jax import bench


def test_fewshot_bench_agrees_with_sklearn(tmp_path, capsys):
  path = tmp_path / "bench.json"
  status = bench.main([
      "bench", "--fewshot", "--fewshot_classes=4", "--fewshot_dim=12",
      "--fewshot_shots=1,5", "--fewshot_seeds=2", "--fewshot_test_per_class=5",
      "--fewshot_l2_exponents=-2,4,10", "--repeats=1", f"--json={path}"])
  assert status == 0
  result = json.loads(path.read_text())["fewshot"]
  assert result["setup"]["fits"] == 2 * 2 * 3
  assert result["setup"]["eigendecompositions"] == 2 * 2
  assert result["accuracies_agree"]
  assert result["speedup"] > 0
  assert set(result["loo_l2_per_shots"]) == {"1", "5"}
  assert "speedup" in capsys.readouterr().out


def test_bench_without_mode_fails(capsys):
  assert bench.main(["bench"]) == 1
  assert "--fewshot" in capsys.readouterr().err
