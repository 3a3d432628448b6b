"""Every config loads, validates its arguments and has a runlocal form."""

import importlib.util
import re
import os

import pytest

from vit_jax import config_utils
from vit_jax import errors
from vit_jax import models
from vit_jax import sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["vit", "pretrain"])
def test_every_variant_and_dataset(name):
  module = _module(name)
  for dataset in module.DATASETS:
    for variant in models.VARIANTS:
      c = module.get_config(f"{variant},{dataset}")
      assert c.model_name == variant and c.dataset == dataset
      local = module.get_config(f"{variant},{dataset},runlocal")
      stride = models.create(variant, num_classes=1).encoder_stride[0]
      assert local.image_size[0] % stride == 0
      assert local.batch_size <= 16 and local.total_steps <= 10
  with pytest.raises(errors.Error, match="unknown variant 'Z/1'"):
    module.get_config("Z/1,cifar10")
  with pytest.raises(errors.Error, match="unknown dataset 'nope'"):
    module.get_config("B/16,nope")


def test_paper_recipes():
  ft = _module("vit").get_config("B/16,cifar10")
  assert (ft.optim.name, ft.optim.kwargs.momentum, ft.batch_size) == (
      "sgd", 0.9, 512)
  assert ft.optim.clip_norm == 1.0 and ft.image_size == (384, 384)
  assert ft.total_steps == 10_000 and not ft.init_head and ft.resample_posemb
  assert _module("vit").get_config("B/16,oxford_iiit_pet").total_steps == 500
  assert _module("vit").get_config("B/16,imagenet2012").total_steps == 20_000
  pt = _module("pretrain").get_config("L/16,imagenet21k")
  assert (pt.optim.kwargs.b1, pt.optim.kwargs.b2) == (0.9, 0.999)
  assert pt.batch_size == 4096 and pt.optim.warmup_steps == 10_000
  assert pt.model.representation_size == 1024
  assert pt.model.dropout_rate == 0.1


def test_digits_config_and_steps_from_epochs():
  c = _module("digits").get_config()
  assert c.dataset == "digits" and not c.pp.flip
  assert c.evals.fewshot.datasets[0][2:] == ("train", "test")
  assert _module("digits").get_config("runlocal").total_steps < c.total_steps
  c.total_steps = None
  c.total_epochs = 2.0
  assert config_utils.resolve_steps(c, 1437) == -(-2 * 1437 // c.batch_size)
  c.total_epochs = None
  with pytest.raises(errors.Error, match="total_steps or"):
    config_utils.resolve_steps(c, 1437)


def test_resolved_config_round_trip(tmp_path):
  c = _module("digits").get_config()
  config_utils.save_config(c, str(tmp_path), extra={"resolved": {"x": 1}})
  back = config_utils.load_config(str(tmp_path))
  assert back.image_size == c.image_size and back.resolved.x == 1
  assert back.mesh == c.mesh


# A non-default value for every VisionTransformer field: the command-line
# text and the value the model must get. A new field without an entry here
# fails `test_every_model_field_is_a_config_field`.
FIELD_VALUES = {
    "num_classes": ("7", 7),
    "patch_size": ("(4,8)", (4, 8)),
    "hidden_size": ("32", 32),
    "num_layers": ("3", 3),
    "num_heads": ("8", 8),
    "mlp_dim": ("48", 48),
    "image_size": ("(16,32)", (16, 32)),
    "num_channels": ("3", 3),
    "classifier": ("gap", "gap"),
    "posemb": ("sincos2d", "sincos2d"),
    "representation_size": ("24", 24),
    "dropout_rate": ("0.1", 0.1),
    "attention_dropout_rate": ("0.2", 0.2),
    "stochastic_depth": ("0.3", 0.3),
    "qkv_bias": ("False", False),
    "qk_scale": ("0.25", 0.25),
    "hidden_act": ("gelu", "gelu"),
    "layer_norm_eps": ("1e-12", 1e-12),
    "head_bias_init": ("-2.5", -2.5),
    "scan": ("True", True),
    "remat_policy": ("nothing_saveable", "nothing_saveable"),
    "attention_impl": ("einsum", "einsum"),
    "dtype": ("bfloat16", "bfloat16"),
    "param_dtype": ("bfloat16", "bfloat16"),
    "use_mask_token": ("True", True),
    "decoder": ("True", True),
    "resnet": ("{'num_layers':(2,2),'width_factor':2}",
               {"num_layers": (2, 2), "width_factor": 2}),
}


@pytest.mark.parametrize("field", models.FIELDS)
def test_every_model_field_is_a_config_field(field, tmp_path, monkeypatch):
  from vit_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  text, want = FIELD_VALUES[field]
  prefix = "" if field in config_utils.DATA_FIELDS else "model."
  assert (field in config_utils.DATA_FIELDS) != (
      field in config_utils.model_config())
  message = main._parse([  # pylint: disable=protected-access
      "main", "--config=configs/digits.py", f"--workdir={tmp_path}",
      f"--config.{prefix}{field}={text}"])
  assert message is None, message
  config = main._CONFIG.value  # pylint: disable=protected-access
  if field == "image_size":
    assert sizes.pair(config.image_size) == want
    return
  if field == "num_channels":
    assert config.num_channels == want
    return
  kwargs = config_utils.model_kwargs(config)
  model = models.create(config.model_name, **kwargs)
  got = getattr(model, field)
  if field == "resnet":
    got = dict(got)
  assert got == want
  # Everything else keeps the config's value.
  assert model.hidden_size == (32 if field == "hidden_size" else 64)


def test_image_size_given_as_an_int(tmp_path, monkeypatch):
  from vit_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  assert main._parse([  # pylint: disable=protected-access
      "main", "--config=configs/digits.py", f"--workdir={tmp_path}",
      "--config.image_size=24"]) is None
  assert sizes.pair(main._CONFIG.value.image_size) == (24, 24)  # pylint: disable=protected-access


def test_simmim_config():
  module = _module("simmim")
  for variant in ("B/16", "S/16"):
    c = module.get_config(f"{variant},imagenet2012")
    assert c.task == "simmim" and c.simmim.mask_ratio == 0.6
    assert c.simmim.mask_unit == 32 and c.optim.weight_decay == 0.05
    assert c.optim.lr == pytest.approx(1e-4 * c.batch_size / 512)
  digits = module.get_config("digits")
  assert digits.model.hidden_size == _module("digits").get_config(
  ).model.hidden_size
  assert module.get_config("digits,runlocal").total_steps < digits.total_steps
  with pytest.raises(errors.Error, match="unknown variant"):
    module.get_config("Q/3,imagenet2012")


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "--config.batch_size=0 is invalid"),
    ("batch_size", -8, "it must be an integer >= 1, e.g. --config.batch_size=512"),
    ("optim.lr", float("nan"), "--config.optim.lr=nan is invalid"),
    ("optim.lr", 0.0, "it must be a number finite in float32 (below 3.4e38) > 0, e.g. --config.optim.lr=0.001"),
    ("optim.lr", 1e39, "it must be a number finite in float32 (below 3.4e38) > 0"),
    ("optim.lr", float("inf"), "--config.optim.lr=inf is invalid"),
    ("total_steps", 0, "--config.total_steps=0 is invalid"),
    ("total_epochs", -1.0, "--config.total_epochs=-1.0 is invalid"),
    ("eval_batch_size", 0, "--config.eval_batch_size=0 is invalid"),
    ("optim.warmup_steps", -1, "--config.optim.warmup_steps=-1"),
    ("optim.ema_decay", 1.0, ">= 0 and < 1"),
    ("optim.layer_decay", 1.5, "<= 1"),
    ("image_size", (16, 16, 3), "--config.image_size=(16, 16, 3) is invalid"),
    ("image_size", (0, 16), "must be positive"),
])
def test_validate_refuses_bad_values(field, value, message):
  c = _module("digits").get_config()
  config_utils.validate(c)  # The shipped config is valid.
  target = c
  *parents, last = field.split(".")
  for p in parents:
    target = target[p]
  target[last] = value
  with pytest.raises(errors.Error, match=re.escape(message)):
    config_utils.validate(c)
