"""Tests of the optax chain built from config (vit_jax/optim.py)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import config_utils
from vit_jax import errors
from vit_jax import models
from vit_jax import optim


def _cfg(**kw):
  c = config_utils.default_config().optim
  c.update(kw)
  return c


def _params():
  return {"embedding": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))},
          "head": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))}}


def _step(tx, params, grads):
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  return updates


@pytest.mark.parametrize("name", ["cosine", "linear", "rsqrt", "constant"])
def test_schedule_warmup_and_decay(name):
  total, warmup, lr, end = 100, 10, 0.5, 0.05
  sched = optim.make_schedule(
      _cfg(lr=lr, warmup_steps=warmup, schedule=name, end_lr=end), total)
  # Linear warmup reaches the peak at the end of warmup.
  np.testing.assert_allclose(sched(0), lr * 1 / warmup, rtol=1e-6)
  np.testing.assert_allclose(sched(warmup - 1), lr, rtol=1e-6)
  mid = warmup + (total - warmup) // 2
  expected_mid = {"cosine": end + (lr - end) * 0.5,
                  "linear": lr + (end - lr) * 0.5,
                  "rsqrt": lr * math.sqrt(warmup / mid),
                  "constant": lr}[name]
  np.testing.assert_allclose(sched(mid), expected_mid, rtol=1e-5)
  if name in ("cosine", "linear"):
    np.testing.assert_allclose(sched(total), end, rtol=1e-5)


def test_schedule_errors():
  with pytest.raises(errors.Error, match="unknown schedule"):
    optim.make_schedule(_cfg(schedule="exp"), 10)
  with pytest.raises(errors.Error, match="warmup_steps=20"):
    optim.make_schedule(_cfg(warmup_steps=20), 10)


def test_sgd_momentum_matches_formula():
  tx, _ = optim.make(_cfg(name="sgd", lr=0.1, schedule="constant",
                          kwargs=ml_collections.ConfigDict({"momentum": 0.9})),
                     _params(), 10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  state = tx.init(params)
  u1, state = tx.update(grads, state, params)
  u2, state = tx.update(grads, state, params)
  np.testing.assert_allclose(u1["head"]["bias"], -0.1 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(u2["head"]["bias"], -0.1 * 2.0 * 1.9, rtol=1e-6)


def test_weight_decay_on_kernels_only_and_scaled_by_lr():
  lr, wd = 0.1, 0.5
  tx, _ = optim.make(_cfg(name="sgd", lr=lr, schedule="constant",
                          weight_decay=wd), _params(), 10)
  zeros = jax.tree.map(jnp.zeros_like, _params())
  updates = _step(tx, _params(), zeros)
  np.testing.assert_allclose(updates["embedding"]["kernel"], -lr * wd)
  np.testing.assert_allclose(updates["head"]["kernel"], -lr * wd)
  np.testing.assert_allclose(updates["embedding"]["bias"], 0.0)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)


def test_adamw_matches_optax_adamw():
  params = _params()
  grads = jax.tree.map(lambda p: p * 0.3 + 0.1, params)
  mask = jax.tree.map(lambda x: x.ndim == 2, params)
  ours, _ = optim.make(_cfg(name="adamw", lr=1e-2, schedule="constant",
                            weight_decay=0.1), params, 10)
  ref = optax.adamw(1e-2, weight_decay=0.1, mask=mask)
  for a, b in zip(jax.tree.leaves(_step(ours, params, grads)),
                  jax.tree.leaves(_step(ref, params, grads))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_frozen_params_and_lr_multipliers():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = optim.make(_cfg(name="sgd", lr=1.0, schedule="constant",
                          kwargs=ml_collections.ConfigDict({"momentum": 0.0}),
                          frozen=r"^embedding/",
                          lr_mults=((r"^head/bias$", 0.1),)), params, 10)
  state = tx.init(params)
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["embedding"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["embedding"]["bias"], 0.0)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)
  np.testing.assert_allclose(updates["head"]["bias"], -0.1, rtol=1e-6)
  # Frozen parameters carry no optimizer state (momentum buffers).
  sizes = sum(x.size for x in jax.tree.leaves(state))
  assert sizes < sum(x.size for x in jax.tree.leaves(params)) + 4


def test_gradient_clipping():
  tx, _ = optim.make(_cfg(name="sgd", lr=1.0, schedule="constant",
                          kwargs=ml_collections.ConfigDict({"momentum": 0.0}),
                          clip_norm=1.0), _params(), 10)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 10.0), _params())
  updates = _step(tx, _params(), grads)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def test_any_optax_optimizer_by_name():
  params = _params()
  grads = jax.tree.map(lambda p: p * 0.3 - 0.1, params)
  ours, _ = optim.make(
      _cfg(name="lion", lr=1e-3, schedule="constant",
           kwargs=ml_collections.ConfigDict({"weight_decay": 0.0})),
      params, 10)
  ref = optax.lion(1e-3, weight_decay=0.0)
  for a, b in zip(jax.tree.leaves(_step(ours, params, grads)),
                  jax.tree.leaves(_step(ref, params, grads))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(errors.Error, match="unknown optimizer 'nope'"):
    optim.make(_cfg(name="nope"), params, 10)
  with pytest.raises(errors.Error, match="freezes every parameter"):
    optim.make(_cfg(frozen="."), params, 10)


def test_ema_update_with_warmup():
  ema = {"w": jnp.zeros(3)}
  params = {"w": jnp.ones(3)}
  # At step 0 the effective decay is min(0.9999, 1/10) = 0.1.
  out = optim.ema_update(ema, params, 0.9999, 0)
  np.testing.assert_allclose(out["w"], 0.9, rtol=1e-6)
  # Late in training the configured decay applies.
  out = optim.ema_update(ema, params, 0.99, 10**6)
  np.testing.assert_allclose(out["w"], 0.01, rtol=1e-4)


def test_regex_paths():
  paths = optim.tree_paths(_params())
  assert paths["embedding"]["kernel"] == "embedding/kernel"
  mask = optim.regex_mask(_params(), r"/kernel$")
  assert mask["head"]["kernel"] and not mask["head"]["bias"]


# Layer-wise learning-rate decay.

L = 3


def _vit_params(scan=False, shapes=False):
  """A 3-block ViT with cls, mask token, pre_logits and head.

  Shapes from `jax.eval_shape` of `model.init`; with shapes=False random
  float32 values of those shapes (cheaper than running the init).
  """
  model = models.create("testing", num_layers=L, hidden_size=8, num_heads=2,
                        mlp_dim=16, patch_size=4, image_size=8, num_classes=5,
                        representation_size=6, use_mask_token=True, scan=scan)
  x = jnp.zeros((1, 8, 8, 3))
  tree = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0)}, x)["params"])
  if shapes:
    return tree
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), tree)


def _expected_id(path):
  """The layer id spelled out for the testing model's parameter names."""
  if path.split("/")[0] in ("embedding", "cls", "mask_token"):
    return 0
  if path.startswith("Transformer/posembed_input/"):
    return 0
  if path.startswith("Transformer/encoderblock_"):
    return int(path.split("/")[1].split("_")[1]) + 1
  assert path.split("/")[0] in ("Transformer", "pre_logits", "head"), path
  return L + 1


def _flat(tree):
  return dict(zip(jax.tree.leaves(optim.tree_paths(tree)),
                  jax.tree.leaves(tree)))


def test_layer_decay_multipliers_unscanned():
  shapes = _vit_params(shapes=True)
  assert optim.num_encoder_layers(shapes) == L
  mults = _flat(optim.layer_decay_multipliers(shapes, 0.5))
  # Every group of parameters is present and gets decay ** (L + 1 - id).
  assert mults["embedding/kernel"] == 0.5 ** 4
  assert mults["cls"] == mults["mask_token"] == 0.5 ** 4
  assert mults["Transformer/posembed_input/pos_embedding"] == 0.5 ** 4
  assert mults["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == (
      0.5 ** 3)
  assert mults["Transformer/encoderblock_2/LayerNorm_0/scale"] == 0.5
  for name in ("Transformer/encoder_norm/scale", "pre_logits/kernel",
               "head/kernel", "head/bias"):
    assert mults[name] == 1.0, name
  for path, m in mults.items():
    assert m == 0.5 ** (L + 1 - _expected_id(path)), path
  # layer_decay = 1 is the identity.
  assert set(_flat(optim.layer_decay_multipliers(shapes, 1.0)).values()) == {
      1.0}


def test_layer_decay_multipliers_scanned_match_per_block():
  per_block = _flat(optim.layer_decay_multipliers(_vit_params(shapes=True),
                                                  0.7))
  shapes = _vit_params(scan=True, shapes=True)
  assert optim.num_encoder_layers(shapes) == L
  stacked_shapes = _flat(shapes)
  mults = _flat(optim.layer_decay_multipliers(shapes, 0.7))
  n_stacked = 0
  for path, m in mults.items():
    if path.startswith("Transformer/encoderblock/"):
      n_stacked += 1
      rest = path[len("Transformer/encoderblock/"):]
      ndim = len(stacked_shapes[path].shape)
      assert np.shape(m) == (L,) + (1,) * (ndim - 1), path
      np.testing.assert_array_equal(
          np.reshape(m, -1),
          [per_block[f"Transformer/encoderblock_{i}/{rest}"]
           for i in range(L)])
      np.testing.assert_allclose(np.reshape(m, -1),
                                 [0.7 ** 3, 0.7 ** 2, 0.7], rtol=1e-15)
    else:
      assert m == per_block[path], path
  assert n_stacked == 16 == sum(  # LayerNorms, q/k/v/out and Dense: 2 each.
      p.startswith("Transformer/encoderblock_0/") for p in per_block)


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_sgd_update_matches_formula(scan):
  params = _vit_params(scan=scan)
  lr, decay = 0.1, 0.5
  tx, _ = optim.make(_cfg(name="sgd", lr=lr, schedule="constant",
                          kwargs=ml_collections.ConfigDict({"momentum": 0.0}),
                          layer_decay=decay), params, 10)
  rng = np.random.default_rng(1)
  grads = jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  updates = _flat(updates)
  flat_grads = _flat(grads)
  for path, u in updates.items():
    g = np.asarray(flat_grads[path], np.float64)
    if path.startswith("Transformer/encoderblock/"):
      for i in range(L):  # Row i of the stacked leaf is block i (id i + 1).
        np.testing.assert_allclose(u[i], -lr * decay ** (L - i) * g[i],
                                   rtol=1e-6, err_msg=path)
    else:
      np.testing.assert_allclose(
          u, -lr * decay ** (L + 1 - _expected_id(path)) * g, rtol=1e-6,
          err_msg=path)


def test_layer_decay_scales_weight_decay_and_composes():
  params = _vit_params()
  lr, wd, decay = 0.1, 0.5, 0.5
  tx, _ = optim.make(_cfg(name="sgd", lr=lr, schedule="constant",
                          kwargs=ml_collections.ConfigDict({"momentum": 0.0}),
                          weight_decay=wd, layer_decay=decay,
                          lr_mults=((r"^embedding/", 0.1),),
                          frozen=r"^cls$"), params, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  # Zero gradients: the update is the decoupled weight decay, layer-scaled.
  w = params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
  np.testing.assert_allclose(
      updates["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]
      ["kernel"], -lr * wd * decay ** 3 * w["kernel"], rtol=1e-6)
  # lr_mults and layer decay multiply.
  np.testing.assert_allclose(
      updates["embedding"]["kernel"],
      -lr * wd * 0.1 * decay ** 4 * params["embedding"]["kernel"], rtol=1e-6)
  np.testing.assert_allclose(updates["cls"], 0.0)  # Frozen.


def test_layer_decay_errors():
  vit = _vit_params(shapes=True)
  for bad in (1.5, -0.1):
    with pytest.raises(errors.Error, match=r"layer_decay=.* must be in \(0, 1\]"):
      optim.make(_cfg(layer_decay=bad), vit, 10)
  with pytest.raises(errors.Error, match="no Transformer/encoderblock"):
    optim.make(_cfg(layer_decay=0.75), _params(), 10)
  # 0 disables it: any tree is fine.
  optim.make(_cfg(layer_decay=0.0), _params(), 10)
