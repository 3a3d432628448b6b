"""The BiT ResNet family: registry, timm parity, training and conversion.

Parity is with timm's ResNetV2 as built by `timm.create_model(
"resnetv2_50x1_bit")`: parameter counts of the registered variants, outputs
of a small network on the same weights, and exports that timm loads. The
timm comparisons are skipped where torch and timm are not installed.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import config_utils
from vit_jax import main
from vit_jax import metrics
from vit_jax import models
from vit_jax.convert import bit
from vit_jax.convert import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = jax.random.PRNGKey(0)

# A BiT-R26x1 shrunk to two one-unit stages at half width (32 to 256
# channels: timm's 32 GroupNorm groups fit, so it exports), on 16x16 digits.
TINY_BIT = [
    "--config=configs/digits.py:runlocal", "--config.model_name=BiT-R26x1",
    "--config.model.resnet={'num_layers': (1, 1), 'width_factor': 0.5}",
    "--config.total_steps=5", "--config.log_steps=1",
    "--config.checkpoint_steps=5", "--config.evals.eval.every=0",
    "--config.evals.fewshot.every=0", "--config.progress=False",
    "--config.batch_size=16", "--config.eval_batch_size=120",
    "--config.optim.warmup_steps=1",
]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def _count(model, size=224):
  images = jax.ShapeDtypeStruct((1, size, size, model.num_channels),
                                jnp.float32)
  shapes = jax.eval_shape(model.init, {"params": RNG}, images)["params"]
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def _timm_count(name, device=None):
  timm = pytest.importorskip("timm")
  kw = {} if device is None else {"device": device}
  net = timm.create_model(name, pretrained=False, **kw)
  return sum(p.numel() for p in net.parameters())


def test_parameter_count_matches_timm_resnetv2_50x1_bit():
  ours = _count(models.create("BiT-R50x1", num_classes=1000, image_size=224))
  theirs = _timm_count("resnetv2_50x1_bit")
  print(f"BiT-R50x1: ours {ours:,}, timm resnetv2_50x1_bit {theirs:,}")
  assert ours == theirs == 25_549_352


@pytest.mark.parametrize("name,timm_name", [
    ("BiT-R101x1", "resnetv2_101x1_bit"),
    ("BiT-R50x3", "resnetv2_50x3_bit"),
    ("BiT-R152x2", "resnetv2_152x2_bit"),
])
def test_parameter_counts_of_other_timm_models(name, timm_name):
  ours = _count(models.create(name, num_classes=1000))
  theirs = _timm_count(timm_name, device="meta")  # Shapes only.
  print(f"{name}: ours {ours:,}, timm {timm_name} {theirs:,}")
  assert ours == theirs


def _random_timm(layers=(1, 1, 1, 1), num_classes=10, seed=0):
  """A small timm BiT ResNetV2 with non-trivial GroupNorm affines and head."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  torch.manual_seed(seed)
  net = bit.create_timm(dict(layers=list(layers), width_factor=1,
                             num_classes=num_classes))
  with torch.no_grad():
    for name, p in net.named_parameters():
      if "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + float(name.endswith("weight")))
      elif name.startswith("head"):
        p.copy_(torch.randn_like(p) * 0.05)
  return net


@pytest.fixture(scope="module")
def timm_net():
  return _random_timm()


def test_to_timm_from_timm_round_trip(timm_net):
  sd = {k: v.numpy() for k, v in timm_net.state_dict().items()}
  back = bit.to_timm(bit.from_timm(sd))
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  assert bit.model_fields(sd) == dict(
      resnet=dict(num_layers=(1, 1, 1, 1), width_factor=1), num_classes=10,
      num_channels=3)


@pytest.mark.parametrize("size", [(64, 64), (64, 48)])
def test_outputs_match_timm(timm_net, size):
  torch = pytest.importorskip("torch")
  sd = {k: v.numpy() for k, v in timm_net.state_dict().items()}
  params = bit.from_timm(sd)
  model = models.create("BiT-R50x1", image_size=size, **bit.model_fields(sd))
  images = np.random.default_rng(0).uniform(
      -1, 1, (2, *size, 3)).astype(np.float32)
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                 train=False))(params, images)
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ref_logits = timm_net(x).numpy()
    ref_pre = timm_net.forward_head(timm_net.forward_features(x),
                                    pre_logits=True).numpy()
  d_logits = float(np.abs(np.asarray(logits) - ref_logits).max())
  d_pre = float(np.abs(np.asarray(out["pre_logits"]) - ref_pre).max())
  print(f"{size}: max |Δ| logits {d_logits:.2e}, pre_logits {d_pre:.2e} "
        f"(|logits| up to {np.abs(ref_logits).max():.2f})")
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  assert d_logits < 1e-4 and d_pre < 1e-4
  np.testing.assert_array_equal(out["patch_mean"], out["pre_logits"])


def test_registered_names_load_into_timm_create_model():
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  model = models.create("BiT-R50x1", num_classes=7)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, {"params": RNG}, images)["params"]
  params = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
  sd = bit.to_timm(params)
  net = timm.create_model("resnetv2_50x1_bit", pretrained=False,
                          num_classes=7)
  net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                      strict=True)
  assert bit.timm_name(model) == "resnetv2_50x1_bit"
  assert bit.timm_kwargs(model)["layers"] == [3, 4, 6, 3]


def test_registry_and_fields():
  for name in ("BiT-R26x1", "BiT-R50x1", "BiT-R50x3", "BiT-R101x1",
               "BiT-R101x3", "BiT-R152x2", "BiT-R152x4"):
    assert name in models.VARIANTS and models.is_bit(name)
    assert isinstance(models.create(name), models.BiT)
  assert not models.is_bit("B/16")
  assert "hidden_size" not in models.BIT_FIELDS
  model = models.create("BiT-R50x1", num_classes=10, image_size=32)
  assert (model.num_classes, model.image_size) == (10, 32)
  assert dict(model.resnet) == dict(num_layers=(3, 4, 6, 3), width_factor=1)
  assert model.encoder_stride == (32, 32) and model.hidden_size == 2048
  assert model.grid_size((224, 200)) == (7, 7)
  assert models.get_config("BiT-R152x4")["hidden_size"] == 8192
  # A partial resnet dict keeps the variant's other key.
  shrunk = models.create("BiT-R26x1", resnet={"width_factor": 0.25})
  assert dict(shrunk.resnet) == dict(num_layers=(2, 2, 2, 2),
                                     width_factor=0.25)
  assert shrunk.widths[0] == 16  # Root: 16 channels in 16 groups.
  assert config_utils.architecture("BiT-R50x3") == {
      "resnet": dict(num_layers=(3, 4, 6, 3), width_factor=3)}


def test_fractional_width_runs():
  model = models.create("BiT-R26x1", num_classes=3, image_size=(20, 12),
                        num_channels=1,
                        resnet=dict(num_layers=(1, 1), width_factor=0.25))
  images = jnp.zeros((2, 20, 12, 1))
  variables = jax.jit(model.init)({"params": RNG}, images)
  logits, out = jax.jit(model.apply)(variables, images)
  assert logits.shape == (2, 3) and out["pre_logits"].shape == (2, 128)
  assert out["stage2"].shape[1:3] == model.grid_size((20, 12)) == (3, 2)
  assert not np.asarray(variables["params"]["head"]["kernel"]).any()


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=64), r"unknown BiT field\(s\) \['hidden_size'\] for "
     r"BiT-R50x1 .* valid fields are num_classes, image_size"),
    (dict(resnet=dict(depth=3)), r"unknown resnet fields \['depth'\]"),
    (dict(resnet=dict(num_layers=())), "must be a non-empty sequence"),
    (dict(resnet=dict(width_factor=0)), "width_factor 0 must be a positive"),
    (dict(dtype="float33"), "dtype 'float33' is not a dtype"),
])
def test_field_errors_are_one_line(overrides, message):
  with pytest.raises(ValueError, match=message) as info:
    models.create("BiT-R50x1", **overrides)
  assert "\n" not in str(info.value)


def test_attention_is_refused():
  model = models.create("BiT-R26x1", num_classes=2, image_size=32)
  with pytest.raises(ValueError, match="no attention weights"):
    jax.eval_shape(lambda x: model.init({"params": RNG}, x,
                                        output_attentions=True),
                   jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_runlocal_shrinks_the_resnet():
  from vit_jax import config_utils as cu  # pylint: disable=g-import-not-at-top
  c = cu.default_config()
  c.model.update(cu.architecture("BiT-R101x3"))
  cu.shrink_to_runlocal(c, "BiT-R101x3", "test")
  assert c.model.resnet == dict(num_layers=(1, 1, 1, 1), width_factor=0.25)
  assert c.model.num_layers is None and c.image_size == (64, 64)


def _run(capfd, *args):
  rc = main.run(["vit_jax.main", *args])
  out, err = capfd.readouterr()
  return rc, out + err


def test_tiny_bit_trains_checkpoints_and_converts(capfd, tmp_path):
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, *TINY_BIT, f"--workdir={workdir}")
  assert rc == 0, out
  # digits.py's ViT fields are set by the file: dropped with a note.
  assert "note: BiT-R26x1 is a BiT ResNet: ignoring the ViT fields" in out
  losses = [r["train/loss"] for r in metrics.read_jsonl(workdir)
            if "train/loss" in r]
  assert len(losses) == 5 and np.all(np.isfinite(losses))
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["5"]
  assert "step 5: fewshot: pre_logits" in out and "eval/accuracy=" in out
  # The commands to run next: timm's ResNetV2 is the only conversion, and
  # the analyses (of attention) do not apply.
  assert f"--from={workdir} --to=timm --out={workdir}/timm.safetensors" in out
  assert "--to=hf" not in out and "vit_jax.analyze" not in out
  params, model, _ = checkpoint.model_from_workdir(workdir)
  assert isinstance(model, models.BiT) and model.num_channels == 1
  assert dict(model.resnet) == dict(num_layers=(1, 1), width_factor=0.5)
  logits, _ = model.apply({"params": params}, np.zeros((2, 16, 16, 1)))
  assert logits.shape == (2, 10)

  # The workdir converts to timm's ResNetV2, checked against it.
  torch = pytest.importorskip("torch")
  pytest.importorskip("timm")
  dest = str(tmp_path / "bit.pth")
  diffs = cli.run(cli.parser().parse_args(
      [f"--from={workdir}", "--to=timm", f"--out={dest}", "--verify"]))
  assert set(diffs) == {"logits", "params"} and max(diffs.values()) < 1e-4
  net = bit.create_timm(bit.timm_kwargs(model))
  net.load_state_dict(torch.load(dest), strict=True)
  # Hugging Face's ViT classes cannot hold it: one line, pointing to timm.
  assert cli.main([f"--from={workdir}", "--to=hf",
                   f"--out={tmp_path / 'hf'}"]) == 1
  _, err = capfd.readouterr()
  assert "BiT ResNet" in err and "--to=timm" in err
  assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["--config.model.hidden_size=32"],
     "error: --config.model.hidden_size does not apply to BiT-R26x1"),
    (["--config.task=simmim"], "error: --config.task=simmim needs a "
     "VisionTransformer"),
    (["--config.model.resnet={'depth': 3}"], "error: unknown resnet fields"),
])
def test_config_errors_are_one_line(capfd, tmp_path, extra, message):
  args = [a for a in TINY_BIT if not a.startswith("--config.model.resnet")]
  if not any(a.startswith("--config.model.resnet") for a in extra):
    args.append(TINY_BIT[2])
  rc, out = _run(capfd, *args, *extra, f"--workdir={tmp_path / 'w'}")
  assert rc == 1 and message in out, out
  assert "Traceback" not in out
  assert len([l for l in out.splitlines() if l.startswith("error:")]) == 1
