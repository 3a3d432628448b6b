"""Mesh, partition rules, and training equivalence across shardings."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import config_utils
from vit_jax import errors
from vit_jax import metrics
from vit_jax import sharding
from vit_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + name, os.path.join(ROOT, "configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**overrides):
  """3 steps of a tiny ViT on digits, logging every step, no dropout."""
  c = load_config("digits", "runlocal")
  c.total_steps = 3
  c.log_steps = 1
  c.evals.eval.every = 0
  c.evals.fewshot.every = -1
  c.checkpoint_steps = 0
  c.progress = False
  c.batch_size = 16
  c.eval_batch_size = 120
  c.image_size = (8, 8)
  c.model.update(dict(hidden_size=16, mlp_dim=32, num_heads=4, num_layers=1,
                      patch_size=4))
  c.update(overrides)
  return c


def losses(workdir):
  rows = metrics.read_jsonl(workdir)
  return np.array([r["train/loss"] for r in rows if "train/loss" in r])


def test_make_mesh():
  mesh = sharding.make_mesh((("data", -1), ("model", 2)))
  assert mesh.shape == {"data": 4, "model": 2}
  with pytest.raises(errors.Error, match="needs 6 devices but there "
                     "are 8"):
    sharding.make_mesh((("data", 3), ("model", 2)))
  with pytest.raises(errors.Error, match="does not fit 8 devices"):
    sharding.make_mesh((("data", -1), ("model", 3)))


def test_partition_rules_and_fsdp():
  mesh = sharding.make_mesh((("data", 4), ("model", 2)))
  rules = config_utils.DEFAULT_PARTITION_RULES
  q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
  assert sharding.partition_spec(q, (16, 4, 4), mesh, rules) == P(
      None, "model", None)
  # Scanned encoder: the leading depth axis stays unsharded.
  stacked = q.replace("encoderblock_0", "encoderblock")
  assert sharding.partition_spec(stacked, (3, 16, 4, 4), mesh, rules) == P(
      None, None, "model", None)
  mlp = "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"
  assert sharding.partition_spec(mlp, (32, 16), mesh, rules) == P(
      "model", None)
  # FSDP: largest free axis divisible by the data axis, above a minimum size.
  assert sharding.partition_spec(mlp, (32, 16), mesh, rules,
                                 fsdp_min_size=64) == P("model", "data")
  assert sharding.partition_spec("head/kernel", (16, 10), mesh, rules,
                                 fsdp_min_size=64) == P("data", None)
  assert sharding.partition_spec("head/bias", (10,), mesh, rules,
                                 fsdp_min_size=64) == P(None)
  assert sharding.partition_spec("head/kernel", (16, 10), mesh, rules,
                                 fsdp_min_size=1000) == P(None, None)
  # Rules also apply inside optimizer state paths.
  assert sharding.partition_spec("opt_state/0/mu/" + mlp, (32, 16), mesh,
                                 rules) == P("model", None)


def test_to_global():
  mesh = sharding.make_mesh((("data", -1), ("model", 1)))
  batch = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  out = sharding.to_global(batch, mesh)
  assert out["image"].shape == (16, 3)
  assert out["image"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_device"))
  c = tiny_config(mesh=(("data", 1), ("model", 1)))
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  return losses(workdir)


@pytest.mark.parametrize("mesh,fsdp", [
    ((("data", 8), ("model", 1)), False),
    ((("data", 8), ("model", 1)), True),
    ((("data", 4), ("model", 2)), True),
])
def test_sharded_training_matches_one_device(reference_losses, tmp_path, mesh,
                                             fsdp):
  c = tiny_config(mesh=mesh, fsdp=fsdp, fsdp_min_size=64)
  train.train_and_evaluate(c, str(tmp_path))
  got = losses(str(tmp_path))
  assert len(got) == 3 and len(reference_losses) == 3
  # The loss changes between steps, so step 2 and 3 exercise the updates.
  assert abs(reference_losses[2] - reference_losses[0]) > 1e-4
  np.testing.assert_allclose(got, reference_losses, rtol=1e-5)


def test_accumulation_and_ema(reference_losses, tmp_path):
  """Two microbatches give the one-batch losses; EMA weights are evaluated."""
  c = tiny_config()
  c.optim.accum_steps = 2
  c.optim.ema_decay = 0.99
  train.train_and_evaluate(c, str(tmp_path))
  np.testing.assert_allclose(losses(str(tmp_path)), reference_losses,
                             rtol=1e-5)
  final = [r for r in metrics.read_jsonl(str(tmp_path))
           if "ema/eval/accuracy" in r]
  assert len(final) == 1 and final[0]["ema/eval/num_examples"] == 360
