"""Mesh, partition rules, and training equivalence across shardings."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import checkpoint
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


def losses(workdir, key="train/loss"):
  """The logged values of `key`, one per logged step (the last row of a step
  logged twice)."""
  rows = {r["step"]: r[key] for r in metrics.read_jsonl(workdir) if key in r}
  return np.array([rows[s] for s in sorted(rows)])


def final_state(workdir):
  """(step, state) of the newest checkpoint in DIR: params, opt_state, rng,
  step (and ema) as numpy."""
  return checkpoint.latest_state(workdir)


def _param_shaped(tree, params_def, path=""):
  """(path, subtree) of every subtree with the parameters' structure (the
  parameters, each of Adam's moments, the EMA)."""
  if jax.tree.structure(tree) == params_def:
    yield path, tree
  elif isinstance(tree, dict):
    for k, v in tree.items():
      yield from _param_shaped(v, params_def, f"{path}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _param_shaped(v, params_def, f"{path}/{i}")


def _no_gradient(path):
  """The attention's key bias: softmax ignores a shift shared by all keys, so
  its gradient is rounding noise, which Adam turns into steps of their own on
  each mesh (2e-5 apart after 4 steps, on values of 3e-5)."""
  names = [getattr(k, "key", None) for k in path[-2:]]
  return names == ["key", "bias"]


def assert_states_close(got, want, rtol=1e-4):
  """Two training states agree: integer leaves (step, rng, Adam's count)
  exactly, and every tree shaped like the parameters (the parameters, Adam's
  moments, the EMA) within `rtol` times the largest magnitude in that tree;
  the key bias, which has no gradient, is left out of the float comparison.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree.leaves(got)):
    if not np.issubdtype(np.asarray(x).dtype, np.floating):
      np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))
  params_def = jax.tree.structure(want["params"])
  trees = dict(_param_shaped(want, params_def))
  assert "/params" in trees and len(trees) >= 3, sorted(trees)  # mu, nu.
  got_trees = dict(_param_shaped(got, params_def))
  for name, tree in trees.items():
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(tree))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(tree),
                            jax.tree.leaves(got_trees[name])):
      if not _no_gradient(path):
        np.testing.assert_allclose(
            y, x, rtol=0, atol=rtol * scale,
            err_msg=f"{name}{jax.tree_util.keystr(path)}")


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
def reference(tmp_path_factory):
  """The one-device run: its workdir and final state."""
  workdir = str(tmp_path_factory.mktemp("one_device"))
  c = tiny_config(mesh=(("data", 1), ("model", 1)))
  train.train_and_evaluate(c, workdir, devices=jax.devices()[:1])
  return workdir, final_state(workdir)[1]


def assert_same_training(workdir, reference_dir, reference_state):
  """The run in DIR took the reference's steps: the loss and gradient norm of
  every step within 1e-5 relative, the final parameters and Adam's moments
  within 1e-4 of each tree's largest magnitude (`assert_states_close`;
  measured: within 4e-7). A gradient off by a constant factor shows in the
  gradient norm of step 1 and in the moments; the losses show it late (at
  step 3: Adam divides the factor out, and clipping to norm 1 hides it in the
  first update)."""
  for key in ("train/loss", "train/grad_norm"):
    got, want = losses(workdir, key), losses(reference_dir, key)
    assert len(got) == len(want) == 3
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
  step, state = final_state(workdir)
  assert step == 3
  state.pop("ema", None)  # Polyak averaging, when on: not in the reference.
  assert_states_close(state, reference_state)


@pytest.mark.parametrize("mesh,fsdp", [
    ((("data", 8), ("model", 1)), False),
    ((("data", 8), ("model", 1)), True),
    ((("data", 4), ("model", 2)), True),
])
def test_sharded_training_matches_one_device(reference, tmp_path, mesh, fsdp):
  c = tiny_config(mesh=mesh, fsdp=fsdp, fsdp_min_size=64)
  train.train_and_evaluate(c, str(tmp_path))
  # The loss changes between steps, so steps 2 and 3 exercise the updates.
  ref_losses = losses(reference[0])
  assert abs(ref_losses[2] - ref_losses[0]) > 1e-4
  assert_same_training(str(tmp_path), *reference)


def test_accumulation_and_ema(reference, tmp_path):
  """Two microbatches take the one-batch steps; EMA weights are evaluated."""
  c = tiny_config()
  c.optim.accum_steps = 2
  c.optim.ema_decay = 0.99
  train.train_and_evaluate(c, str(tmp_path))
  assert set(final_state(str(tmp_path))[1]) == {
      "params", "opt_state", "rng", "step", "ema"}
  assert_same_training(str(tmp_path), *reference)
  final = [r for r in metrics.read_jsonl(str(tmp_path))
           if "ema/eval/accuracy" in r]
  assert len(final) == 1 and final[0]["ema/eval/num_examples"] == 360
