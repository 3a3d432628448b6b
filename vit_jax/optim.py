"""Optimizer from config: an optax chain with schedule, clipping and masks.

The chain, for the trainable parameters, is

  clip_by_global_norm -> optimizer direction -> + weight_decay * param
  -> * -lr(step) -> * lr multiplier

and frozen parameters get no update (and no optimizer state). Weight decay is
decoupled from the gradient statistics and multiplied by the learning rate, as
in `optax.adamw` and the ViT paper (Adam, weight decay 0.1).

Parameter selection uses regexes searched in `/`-joined parameter paths (see
`vit_jax.config_utils`).
"""

import re

import jax
import jax.numpy as jnp
import optax

from vit_jax import config_utils


def path_str(keypath):
  """`/`-joined name of a jax key path."""
  parts = []
  for k in keypath:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def tree_paths(tree):
  """The tree with every leaf replaced by its `/`-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def regex_mask(tree, pattern):
  """Boolean tree: True where `pattern` is found in the leaf's path."""
  if not pattern:
    return jax.tree.map(lambda _: False, tree)
  r = re.compile(pattern)
  return jax.tree.map(lambda p: bool(r.search(p)), tree_paths(tree))


def lr_multipliers(tree, rules):
  """Float tree: the multiplier of the first matching (regex, mult) rule."""
  compiled = [(re.compile(r), float(m)) for r, m in rules]

  def mult(path):
    for r, m in compiled:
      if r.search(path):
        return m
    return 1.0

  return jax.tree.map(mult, tree_paths(tree))


def make_schedule(cfg, total_steps):
  """Learning-rate schedule: linear warmup then the configured decay."""
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  end_lr = float(cfg.get("end_lr", 0.0))
  name = cfg.schedule
  if warmup >= total_steps and name != "constant":
    raise config_utils.Error(
        f"warmup_steps={warmup} must be smaller than the {total_steps} total "
        "steps: lower --config.optim.warmup_steps")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if name == "cosine":
      value = end_lr + (lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif name == "linear":
      value = lr + (end_lr - lr) * frac
    elif name == "rsqrt":
      timescale = max(warmup, 1)
      value = lr * jnp.sqrt(timescale / jnp.maximum(step, timescale))
    elif name == "constant":
      value = jnp.full_like(step, lr)
    else:
      raise config_utils.Error(
          f"unknown schedule {name!r}: use cosine, linear, rsqrt or constant")
    if warmup > 0:
      value = value * jnp.minimum(1.0, (step + 1.0) / warmup)
    return value

  schedule(0)  # Validates the name early.
  return schedule


def _direction(cfg):
  """The optimizer's update direction (before the -lr scaling)."""
  name = cfg.name
  kwargs = dict(cfg.get("kwargs") or {})
  if name == "sgd":
    kwargs.setdefault("momentum", 0.9)
    return optax.trace(decay=kwargs.pop("momentum"),
                       nesterov=kwargs.pop("nesterov", False), **kwargs)
  if name in ("adam", "adamw"):
    return optax.scale_by_adam(**kwargs)
  fn = getattr(optax, name, None)
  if fn is None or not callable(fn):
    raise config_utils.Error(
        f"unknown optimizer {name!r}: use sgd, adam, adamw or an optax "
        "optimizer name such as lion or adafactor")
  # An optax optimizer with unit learning rate returns -direction.
  return optax.chain(fn(learning_rate=1.0, **kwargs), optax.scale(-1.0))


def _scale_by_regex(rules):
  """Multiplies each update leaf by its learning-rate multiplier."""

  def update_fn(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, rules)
    return jax.tree.map(lambda u, m: u * m if m != 1.0 else u,
                        updates, mults), state

  return optax.GradientTransformation(
      lambda _: optax.EmptyState(), update_fn)


def make(cfg, params, total_steps):
  """Builds the optimizer.

  Args:
    cfg: the `config.optim` ConfigDict.
    params: the parameter tree (or its shapes).
    total_steps: number of training steps (for the schedule).

  Returns:
    (tx, schedule): an optax GradientTransformation and step -> lr.
  """
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(cfg.clip_norm)))
  parts.append(_direction(cfg))
  if cfg.get("weight_decay"):
    parts.append(optax.add_decayed_weights(
        float(cfg.weight_decay),
        mask=lambda p: regex_mask(p, cfg.wd_pattern)))
  parts.append(optax.scale_by_learning_rate(schedule))
  if cfg.get("lr_mults"):
    parts.append(_scale_by_regex(tuple(cfg.lr_mults)))
  tx = optax.chain(*parts)

  frozen = regex_mask(params, cfg.get("frozen", ""))
  if any(jax.tree.leaves(frozen)):
    if all(jax.tree.leaves(frozen)):
      raise config_utils.Error(
          f"optim.frozen={cfg.frozen!r} freezes every parameter: nothing "
          "would be trained")
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule


def ema_update(ema, params, decay, step):
  """Polyak averaging with the usual warmup: decay ramps up as (1+t)/(10+t)."""
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype),
                      ema, params)
