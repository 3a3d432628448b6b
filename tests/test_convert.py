"""Conversion to Hugging Face / timm and back, with the real transformers and timm.

Tiny models (width 32, 2 layers, 4 heads, 16x16 or 16x24 images, patch 4). Every case
exports, loads the export with the real library (no missing / unexpected keys, no
tensor left unset), compares outputs of ours and theirs on the same batch (fp32,
max |Δ| <= 1e-4), then converts back and compares parameters bitwise. A test
that needs torch, transformers, timm or safetensors (the `torch` extra) is
skipped where they are not installed; the rest run without them.
"""

import json

import jax
import numpy as np
import pytest

from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import cli
from vit_jax.convert import core
from vit_jax.convert import hf
from vit_jax.convert import infer
from vit_jax.convert import parity
from vit_jax.convert import timm as timm_conv

BASE = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=4,
            image_size=16, num_channels=3, num_classes=5, classifier="token")

HF_CASES = {
    "token": {},
    "token_nobias_gelu_nonsquare": dict(qkv_bias=False, hidden_act="gelu",
                                        image_size=(16, 24), num_channels=1),
    "token_eps1e-12_regression_nonsquare_patch": dict(
        layer_norm_eps=1e-12, num_classes=1, patch_size=(4, 8), image_size=(16, 24)),
    "pre_logits": dict(representation_size=24, num_classes=0),
    "pre_logits_with_head": dict(representation_size=24),
    "no_head": dict(num_classes=0),
    "mim": dict(decoder=True, use_mask_token=True, num_classes=0),
    "sincos2d": dict(posemb="sincos2d"),
    "learn2d": dict(posemb="learn2d"),
    "qk_scale": dict(qk_scale=0.3),
}

TIMM_CASES = {
    "token": {},
    "gap": dict(classifier="gap"),
    "map": dict(classifier="map", hidden_act="gelu"),
    "token_nobias_nonsquare": dict(qkv_bias=False, image_size=(16, 24)),
    "gap_gelu_nonsquare_patch": dict(classifier="gap", hidden_act="gelu",
                                     patch_size=(4, 8), image_size=(16, 24)),
    "no_head": dict(num_classes=0),
    "posemb_none": dict(classifier="gap", posemb="none"),
    "odd_mlp": dict(mlp_dim=37),
    "learn2d_gap_nonsquare": dict(posemb="learn2d", classifier="gap",
                                  image_size=(16, 24)),
}


def make_params(cfg, seed=0):
  """Random values (not the zero inits) for every parameter of the model."""
  model = core.create(cfg)
  h, w = sizes.pair(cfg["image_size"])
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)},
      np.zeros((1, h, w, cfg["num_channels"]), np.float32)))["params"]
  rng = np.random.default_rng(seed)
  flat = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in sorted(npz.flatten(shapes).items())}
  return npz.unflatten(flat)


def _case(overrides):
  cfg = core.full_config(dict(BASE, **overrides))
  return cfg, make_params(cfg)


def _assert_params_equal(a, b, skip=()):
  a, b = npz.flatten(a), npz.flatten(b)
  a = {k: v for k, v in a.items() if k not in skip}
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_round_trip(tmp_path, name):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  cfg, params = _case(HF_CASES[name])
  arch, notes = hf.export(params, cfg, tmp_path / "hf")
  diffs = parity.verify_hf(tmp_path / "hf", params, cfg, arch)
  assert all(v <= 1e-4 for v in diffs.values()), diffs
  assert diffs["params"] == 0.0
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert config["architectures"] == [arch]
  assert config["layer_norm_eps"] == cfg["layer_norm_eps"]
  assert config["hidden_act"] == {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[
      cfg["hidden_act"]]
  assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0

  back, back_cfg, _ = hf.to_ours(*hf.read(tmp_path / "hf"))
  for key in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "num_channels",
              "qkv_bias", "hidden_act", "layer_norm_eps", "representation_size",
              "decoder"):
    assert back_cfg[key] == cfg[key], key
  assert sizes.pair(back_cfg["image_size"]) == sizes.pair(cfg["image_size"])
  dropped = set()
  if arch == hf.MODEL and "head" in params:
    dropped = {"head/kernel", "head/bias"}
    assert any("head" in n for n in notes)
  if cfg["posemb"] == "learn" and cfg["qk_scale"] is None:
    _assert_params_equal(params, back, skip=dropped)
  else:
    # Fixed tables become learned tables, a custom qk_scale is folded into the
    # queries: the model, not the parameter list, is what survives.
    back_cfg_full = core.full_config(back_cfg)
    images, mask = parity.inputs(cfg)
    ours, _ = parity.ours(params, cfg, images)
    again, _ = parity.ours(back, back_cfg_full, images)
    np.testing.assert_allclose(again, ours, atol=1e-5)


def test_hf_arch_choice():
  assert hf.architecture(core.full_config(BASE)) == hf.CLASSIFICATION
  pooled = core.full_config(dict(BASE, representation_size=8))
  assert hf.architecture(pooled) == hf.MODEL and hf.load_kwargs(pooled, hf.MODEL) == {}
  bare = core.full_config(dict(BASE, num_classes=0))
  assert hf.load_kwargs(bare, hf.architecture(bare)) == {"add_pooling_layer": False}


def test_hf_labels_in_config(tmp_path):
  transformers = pytest.importorskip("transformers")
  cfg, params = _case({})
  names = ["ant", "bee", "cat", "dog", "eel"]
  hf.export(params, cfg, tmp_path, labels=names)
  model = transformers.ViTForImageClassification.from_pretrained(tmp_path)
  assert model.config.id2label == dict(enumerate(names))
  assert model.config.label2id == {n: i for i, n in enumerate(names)}
  assert hf.to_ours(*hf.read(tmp_path))[2] == names


@pytest.mark.parametrize("safe", [True, False])
def test_hf_saved_by_transformers_converts_back(tmp_path, safe):
  """Checkpoints written by transformers itself (5.x names in memory, .bin or safetensors)."""
  transformers = pytest.importorskip("transformers")
  cfg, params = _case(dict(decoder=True, use_mask_token=True, num_classes=0))
  hf.export(params, cfg, tmp_path / "ours")
  model = transformers.ViTForMaskedImageModeling.from_pretrained(tmp_path / "ours")
  in_memory = {k: v.numpy() for k, v in model.state_dict().items()}
  assert any(k.startswith("vit.layers.") or k.startswith("vit.encoder.layer.")
             for k in in_memory)
  model.save_pretrained(tmp_path / "saved", safe_serialization=safe)
  back, back_cfg, _ = hf.to_ours(*hf.read(tmp_path / "saved"))
  _assert_params_equal(params, back)
  assert back_cfg["decoder"] and back_cfg["use_mask_token"]
  # The in-memory (5.x) names map back too, with or without the `vit.` prefix.
  _assert_params_equal(params, hf.to_ours(in_memory, json.loads(
      (tmp_path / "ours" / "config.json").read_text()))[0])
  no_prefix = {k[len("vit."):] if k.startswith("vit.") else k: v
               for k, v in in_memory.items()}
  _assert_params_equal(params, hf.to_ours(no_prefix, model.config.to_dict())[0])


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_export(tmp_path, name):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  cfg, params = _case(TIMM_CASES[name])
  path = tmp_path / "timm.npz"
  kw, kw_path, _ = timm_conv.export(params, cfg, path)
  assert json.loads(open(kw_path).read()) == kw
  diffs = parity.verify_timm(path, kw, params, cfg)
  assert all(v <= 1e-4 for v in diffs.values()), diffs
  assert diffs["params"] == 0.0
  # The timm file is our layout: it reads back as the same model.
  back = npz.flatten(npz.load_npz(path))
  zero_biases = {k for k in back
                 if k not in npz.flatten(params) and k != npz.POSEMB}
  for k in zero_biases:
    assert "MultiHeadDotProductAttention_1/" in k and k.endswith("/bias")
    np.testing.assert_array_equal(back[k], 0)
  if cfg["posemb"] == "learn":
    _assert_params_equal(params, {k: v for k, v in back.items() if k not in zero_biases})


def test_timm_kwargs_build_the_matching_model():
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  kw = timm_conv.kwargs(core.full_config(dict(BASE, classifier="gap", mlp_dim=37)))
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  model = VisionTransformer(**kw)
  assert model.blocks[0].mlp.fc1.out_features == 37
  assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
  assert model.cls_token is None and model.global_pool == "avg"
  assert isinstance(model.fc_norm, torch.nn.Identity)


def test_timm_wrong_head_size_is_caught(tmp_path):
  """timm silently skips a head of the wrong size; the NaN fill exposes it."""
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  cfg, params = _case({})
  kw, _, _ = timm_conv.export(params, cfg, tmp_path / "t.npz")
  with pytest.raises(parity.ParityError, match="head.weight"):
    parity.load_timm(tmp_path / "t.npz", dict(kw, num_classes=7))


REFUSALS = [
    ("hf", dict(classifier="gap"), "gap pooling cannot be expressed there; use --to=timm"),
    ("hf", dict(classifier="map"), "map pooling cannot be expressed there; use --to=timm"),
    ("hf", dict(decoder=True, image_size=(16, 24), num_classes=0),
     "square grid: a 4x6 patch grid"),
    ("hf", dict(resnet=dict(num_layers=(), width_factor=1), patch_size=1),
     "hybrid cannot be expressed"),
    ("timm", dict(representation_size=8), "pre_logits .* use --to=hf"),
    ("timm", dict(decoder=True, num_classes=0), "use --to=hf"),
    ("timm", dict(layer_norm_eps=1e-12), "use --to=hf"),
    ("timm", dict(classifier="unpooled", num_classes=0), "not a timm global_pool"),
    ("hf", dict(posemb="relative"), r"^posemb='relative' \(relative position bias "
     r"in attention\) has no equivalent in transformers ViTModel: keep the \.npz"),
    ("timm", dict(posemb="relative", classifier="gap"), r"^posemb='relative' "
     r"\(relative position bias in attention\) has no equivalent in timm "
     r"VisionTransformer: keep the \.npz"),
]


@pytest.mark.parametrize("target,overrides,message", REFUSALS)
def test_refusals_name_the_feature_and_a_target(tmp_path, target, overrides, message):
  cfg = core.full_config(dict(BASE, **overrides))
  with pytest.raises(core.Unsupported, match=message):
    if target == "hf":
      hf.architecture(cfg)
    else:
      timm_conv.kwargs(cfg)


def test_infer_model_config():
  for overrides in ({}, dict(classifier="map", qkv_bias=False, num_classes=0),
                    dict(representation_size=24, classifier="gap"),
                    dict(decoder=True, use_mask_token=True, patch_size=2)):
    cfg, params = _case(overrides)
    inferred = infer.model_config(params)
    for key in cli.STRUCTURAL + ("classifier", "posemb"):
      assert inferred[key] == cfg[key], (overrides, key)
  cfg, params = _case(dict(image_size=(16, 24)))
  with pytest.raises(ValueError, match="not a square grid: pass --image_size"):
    infer.model_config(params)
  assert infer.model_config(params, image_size=(16, 24))["image_size"] == (16, 24)
  with pytest.raises(ValueError, match="gives 3x3 = 9"):
    infer.model_config(params, image_size=12)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_cli_refuses_relative_posemb_in_one_line(tmp_path, capsys, classifier):
  """An .npz of a posemb="relative" model is inferred as such, kept by --to=npz and
  refused by --to=hf / --to=timm with one line naming it."""
  pytest.importorskip("safetensors")
  cfg, params = _case(dict(posemb="relative", classifier=classifier))
  path = tmp_path / "rel.npz"
  npz.save_npz(path, params)
  inferred = infer.model_config(npz.load_npz(path))
  assert inferred["posemb"] == "relative" and inferred["image_size"] == 16
  for target, name in (("hf", "transformers ViTModel"),
                       ("timm", "timm VisionTransformer")):
    out = tmp_path / (target + (".npz" if target == "timm" else ""))
    assert cli.main([f"--from={path}", f"--to={target}", f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: posemb='relative' (relative position bias in "
                          f"attention) has no equivalent in {name}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
  assert cli.main([f"--from={path}", "--to=npz", f"--out={tmp_path / 'b.npz'}",
                   "--verify"]) == 0
  assert "--config.model.posemb=relative" in capsys.readouterr().out
  _assert_params_equal(params, npz.load_npz(tmp_path / "b.npz"))


@pytest.fixture(scope="module")
def npz_file(tmp_path_factory):
  cfg, params = _case(dict(image_size=(16, 24), hidden_act="gelu"))
  path = tmp_path_factory.mktemp("cli") / "model.npz"
  npz.save_npz(path, params)
  return path, params


def test_cli_npz_to_hf_to_npz(tmp_path, npz_file, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  path, params = npz_file
  common = ["--image_size=16,24", "--hidden_act=gelu", "--verify"]
  assert cli.main([f"--from={path}", "--to=hf", f"--out={tmp_path / 'hf'}"] + common) == 0
  out = capsys.readouterr().out
  assert "ViTForImageClassification.from_pretrained" in out and "verify: OK" in out
  assert cli.main([f"--from={tmp_path / 'hf'}", "--to=npz",
                   f"--out={tmp_path / 'back.npz'}", "--verify"]) == 0
  out = capsys.readouterr().out
  assert "--config.model.hidden_act=gelu" in out
  assert "--config.model.layer_norm_eps=1e-06" in out
  _assert_params_equal(params, npz.load_npz(tmp_path / "back.npz"))
  fields = json.loads((tmp_path / "back.json").read_text())["model"]
  assert fields["image_size"] == [16, 24] and fields["hidden_act"] == "gelu"


def test_cli_timm_and_failures(tmp_path, npz_file, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("timm")
  path, _ = npz_file
  args = [f"--from={path}", "--image_size=16,24", "--hidden_act=gelu"]
  assert cli.main(args + ["--to=timm", f"--out={tmp_path / 't.npz'}", "--verify"]) == 0
  assert "verify: OK" in capsys.readouterr().out
  assert json.loads((tmp_path / "t.json").read_text())["act_layer"] == "gelu"
  # A tolerance nothing meets: the parity failure is an exit status of 1.
  assert cli.main(args + ["--to=timm", f"--out={tmp_path / 'u.npz'}", "--verify",
                          "--tol=0"]) == 1
  assert "verify FAILED" in capsys.readouterr().err
  # A refusal is an exit status of 2 with the reason.
  assert cli.main(args + ["--classifier=gap", "--to=hf", f"--out={tmp_path / 'x'}"]) == 1
  assert "error:" in capsys.readouterr().err
  # Without the image size a non-square grid cannot be inferred.
  assert cli.main([f"--from={path}", "--to=hf", f"--out={tmp_path / 'y'}"]) == 1
  assert "--image_size" in capsys.readouterr().err


def test_cli_workdir_source_with_scanned_blocks(tmp_path, capsys):
  """A real orbax checkpoint + config.json, trained layout stacked (scan=True)."""
  transformers = pytest.importorskip("transformers")
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, config_utils  # pylint: disable=g-import-not-at-top
  config = config_utils.default_config()
  config.model_name = "testing"
  config.image_size = (16, 24)
  config.labels = ("a", "b", "c", "d", "e")
  config.model = ml_collections.ConfigDict(dict(
      hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=4,
      num_classes=5, hidden_act="gelu", scan=True))
  cfg = core.full_config(dict(config.model.to_dict(), image_size=(16, 24)))
  params = make_params(cfg)
  assert "encoderblock" in params["Transformer"]  # Stacked on a depth axis.
  workdir = str(tmp_path / "work")
  mngr = checkpoint.Manager(workdir)
  mngr.save(7, {"params": params, "step": np.int32(7)}, {"pos": 0})
  mngr.close()
  config_utils.save_config(config, workdir)
  assert cli.main([f"--from={workdir}", "--to=hf", f"--out={tmp_path / 'hf'}",
                   "--verify"]) == 0
  assert "verify: OK" in capsys.readouterr().out
  model = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf")
  assert model.config.hidden_act == "gelu" and model.config.id2label[4] == "e"
  back, _, _ = hf.to_ours(*hf.read(tmp_path / "hf"))
  _assert_params_equal(npz.unstack_blocks(params), back)
