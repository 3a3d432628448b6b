"""Tests of the optax chain built from config (vit_jax/optim.py)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import config_utils
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
  with pytest.raises(config_utils.Error, match="unknown schedule"):
    optim.make_schedule(_cfg(schedule="exp"), 10)
  with pytest.raises(config_utils.Error, match="warmup_steps=20"):
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
  with pytest.raises(config_utils.Error, match="unknown optimizer 'nope'"):
    optim.make(_cfg(name="nope"), params, 10)
  with pytest.raises(config_utils.Error, match="freezes every parameter"):
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
