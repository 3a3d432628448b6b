"""`python -m vit_jax.bench --throughput` at a tiny size, peers included."""

import json

from vit_jax import bench


def test_throughput_reports_rates_flops_and_peers(tmp_path, capsys):
  path = tmp_path / "bench.json"
  status = bench.main([
      "bench", "--throughput", "--throughput_model=testing",
      "--throughput_batch=8", "--throughput_image_size=32",
      "--throughput_steps=1", "--repeats=1", "--throughput_peers",
      "--peak_tflops=1", f"--json={path}"])
  assert status == 0
  result = json.loads(path.read_text())["throughput"]
  rates = result["images_per_second"]
  assert set(rates) == {"vit_jax inference", "vit_jax train step",
                        "timm inference (cpu)", "transformers inference (cpu)"}
  assert all(rate > 0 for rate in rates.values())
  flops = result["gflops_per_image"]
  # A training step costs about three forward passes.
  assert 2 * flops["inference"] < flops["train step"] < 5 * flops["inference"]
  assert 0 < result["mfu"]["inference"] < 1
  assert "img/s" in capsys.readouterr().out


def test_throughput_rejects_batch_not_divisible_by_devices(capsys):
  status = bench.main(["bench", "--throughput", "--throughput_model=testing",
                       "--throughput_batch=7"])
  assert status == 1
  assert "not divisible by the 8 local devices" in capsys.readouterr().err
