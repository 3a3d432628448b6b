"""`python -m vit_jax.bench throughput` at a tiny size, peers included."""

import json

import jax
import numpy as np
import pytest

from vit_jax import models
from vit_jax.bench import __main__ as bench
from vit_jax.bench import reference
from vit_jax.bench import throughput
from vit_jax.convert import hf as hf_lib
from vit_jax.convert import timm as timm_lib


def test_throughput_reports_rates_flops_and_peers(capsys):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  pytest.importorskip("transformers")
  status = bench.main([
      "bench", "throughput", "--model=testing", "--batch=8",
      "--image_size=32", "--steps=1", "--repeats=1", "--peers",
      "--peak_tflops=1", "--json"])
  assert status == 0
  out = capsys.readouterr().out
  result = json.loads(out)  # --json: the whole of stdout is one JSON object.
  assert result["setup"]["model"] == "testing"
  assert result["setup"]["devices"] == 8
  assert "ynn_fusion_type" in result["setup"]["xla_options"]
  rates = result["images_per_second"]
  assert set(rates) == {"vit_jax", "vision_transformer", "timm (cpu)",
                        "transformers (cpu)"}
  for modes in rates.values():
    for mode in ("train", "inference"):
      r = modes[mode]
      assert 0 < r["min"] <= r["median"] <= r["max"]
  assert result["peers_skipped"] == {}
  ratios = result["ratios"]
  for mode in ("train", "inference"):
    best = max(rates[p][mode]["median"] for p in ("timm (cpu)",
                                                  "transformers (cpu)"))
    assert ratios[f"{mode}: vit_jax / best PyTorch"] == pytest.approx(
        rates["vit_jax"][mode]["median"] / best)
    assert ratios[f"{mode}: vit_jax / vision_transformer"] > 0
  flops = result["gflops_per_image"]
  # A training step costs about three forward passes.
  assert 2 * flops["inference"] < flops["train"] < 5 * flops["inference"]
  assert result["mfu_basis"] == "peak"
  assert 0 < result["mfu"]["inference"] < 1
  # On CPU the GEMM rate is measured in the same run: the MFU basis without
  # --peak_tflops. The table (the output without --json) shows either.
  assert result["gemm_tflops"] > 0
  throughput.report(result)
  table = capsys.readouterr().out
  assert "img/s" in table and "vision_transformer" in table
  assert "MFU train" in table and "1.0 TFLOP/s per device" in table
  throughput.report(dict(result, mfu_basis="measured GEMM"))
  assert "measured float32 GEMM rate" in capsys.readouterr().out


def test_reference_model_is_ours_with_stock_flax_modules():
  """The official architecture computes our function on our parameters."""
  for classifier in ("token", "gap"):
    cfg = models.get_config("testing")
    cfg.update(classifier=classifier)
    ours = models.create("testing", classifier=classifier)
    official = reference.from_fields(cfg)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = jax.jit(ours.init)(jax.random.PRNGKey(1), x)["params"]
    rng = np.random.default_rng(2)
    params = jax.tree.map(  # a non-zero head and biases
        lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
        params)
    assert (jax.tree.structure(jax.eval_shape(official.init,
                                              jax.random.PRNGKey(1), x))
            == jax.tree.structure({"params": params}))
    want = jax.jit(ours.apply)({"params": params}, x)[0]
    got = jax.jit(official.apply)({"params": params}, x)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  with pytest.raises(ValueError, match="no posemb='sincos2d'"):
    reference.from_fields(dict(models.get_config("testing"),
                               posemb="sincos2d"))


def test_peers_are_the_converters_models():
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  pytest.importorskip("transformers")
  cfg = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=40,
             patch_size=8, image_size=32, num_classes=10, hidden_act="gelu")
  nets, skipped = throughput.peer_models(cfg)
  assert not skipped
  timm_net, hf_net = nets["timm"], nets["transformers"]
  kw = timm_lib.kwargs(cfg)
  assert len(timm_net.blocks) == kw["depth"] == 2
  assert timm_net.blocks[0].mlp.fc1.out_features == 40
  assert timm_net.head.out_features == 10
  hf_cfg = hf_net.config
  assert type(hf_net).__name__ == hf_lib.CLASSIFICATION
  assert hf_cfg.hidden_act == "gelu"  # Follows our field, as the export does.
  assert hf_cfg.layer_norm_eps == 1e-6
  assert (hf_cfg.intermediate_size, hf_cfg.num_labels) == (40, 10)


def test_peers_that_cannot_express_the_model_are_skipped():
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  cfg = dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
             patch_size=8, image_size=32, num_classes=10, classifier="gap")
  nets, skipped = throughput.peer_models(cfg)
  assert set(nets) == {"timm"}
  assert "gap pooling cannot be expressed" in skipped["transformers"]


@pytest.mark.parametrize("args, message", [
    (["--model=Z/99"], "unknown model variant 'Z/99'"),
    (["--model=testing", "--batch=0"], "--batch"),
    (["--model=testing", "--batch=7"], "not divisible by the 8 local devices"),
    (["--modle=testing"], "modle"),
    (["--model=testing", "extra"], "unexpected argument"),
])
def test_throughput_bad_input_is_one_error_line(args, message, capsys):
  assert bench.main(["bench", "throughput"] + args) == 1
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert message in lines[0]
