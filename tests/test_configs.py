"""Every config loads, validates its arguments and has a runlocal form."""

import importlib.util
import os

import pytest

from vit_jax import config_utils
from vit_jax import models

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
  with pytest.raises(config_utils.Error, match="unknown variant 'Z/1'"):
    module.get_config("Z/1,cifar10")
  with pytest.raises(config_utils.Error, match="unknown dataset 'nope'"):
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
  assert c.fewshot.datasets[0][2:] == ("train", "test")
  assert _module("digits").get_config("runlocal").total_steps < c.total_steps
  c.total_steps = None
  c.total_epochs = 2.0
  assert config_utils.resolve_steps(c, 1437) == -(-2 * 1437 // c.batch_size)
  c.total_epochs = None
  with pytest.raises(config_utils.Error, match="total_steps or"):
    config_utils.resolve_steps(c, 1437)


def test_resolved_config_round_trip(tmp_path):
  c = _module("digits").get_config()
  config_utils.save_config(c, str(tmp_path), extra={"resolved": {"x": 1}})
  back = config_utils.load_config(str(tmp_path))
  assert back.image_size == c.image_size and back.resolved.x == 1
  assert back.mesh == c.mesh
