"""Optimizer from config: an optax chain with schedule, clipping and masks.

The chain, for the trainable parameters, is

  clip_by_global_norm -> optimizer direction -> + weight_decay * param
  -> * -lr(step) -> * lr multiplier -> * layer-decay multiplier

and frozen parameters get no update (and no optimizer state). Weight decay is
decoupled from the gradient statistics and multiplied by the learning rate, as
in `optax.adamw` and the ViT paper (Adam, weight decay 0.1).

Layer-wise learning-rate decay (`optim.layer_decay`, BEiT/SimMIM fine-tuning;
0 disables it): with L encoder blocks, embedding-side parameters have layer id
0, `Transformer/encoderblock_{i}` id i+1 and everything after the encoder
(encoder_norm, pre_logits, head, MAPHead_0, decoder) id L+1; the update of a
parameter is multiplied by `layer_decay ** (L + 1 - id)` (weight decay
included), per row of the depth axis for a scanned (stacked) encoder.

Parameter selection uses regexes searched in `/`-joined parameter paths (see
`vit_jax.config_utils`).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import errors


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


# Layer-wise learning-rate decay.

_EMBEDDING_SIDE = re.compile(
    r"^(embedding|cls|mask_token|pos_embedding|conv_root|gn_root"
    r"|block\d+/unit\d+)(/|$)|^Transformer/posembed_input(/|$)")
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)(/|$)")
_STACKED = re.compile(r"^Transformer/encoderblock(/|$)")


def num_encoder_layers(tree):
  """Number of encoder blocks L of a parameter tree (arrays or shapes).

  Counts `Transformer/encoderblock_{i}` (per-block layout) or reads the
  leading depth axis of `Transformer/encoderblock/...` (scanned layout).
  """
  paths = jax.tree.leaves(tree_paths(tree))
  shapes = [tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(tree)]
  blocks = {int(m.group(1)) for m in map(_BLOCK.match, paths) if m}
  depths = {shape[0] if shape else 0
            for path, shape in zip(paths, shapes) if _STACKED.match(path)}
  if blocks and depths:
    raise errors.Error(
        "the parameter tree has both per-block (encoderblock_i) and stacked "
        "(encoderblock) encoder layers: cannot assign layer-decay ids")
  if blocks:
    if blocks != set(range(len(blocks))):
      raise errors.Error(
          f"encoder blocks {sorted(blocks)} are not numbered 0..L-1: cannot "
          "assign layer-decay ids")
    return len(blocks)
  if depths:
    if len(depths) != 1 or 0 in depths:
      raise errors.Error(
          "the stacked encoder leaves have different leading (depth) sizes "
          f"{sorted(depths)}: cannot assign layer-decay ids")
    return depths.pop()
  raise errors.Error(
      "optim.layer_decay needs a ViT encoder, but the parameter tree has no "
      "Transformer/encoderblock_i or Transformer/encoderblock: set "
      "--config.optim.layer_decay=0")


def layer_id(path, num_layers):
  """Layer id of a `/`-joined parameter path (None: stacked encoder leaf).

  0 for the embedding side (patch embedding, cls, mask token, position
  embeddings, hybrid stem), i+1 for `Transformer/encoderblock_{i}`, and
  L+1 for everything else (encoder_norm, pre_logits, head, MAPHead_0,
  decoder). A leaf of a scanned encoder holds the ids 1..L along its leading
  axis: None is returned for it.
  """
  if _EMBEDDING_SIDE.search(path):
    return 0
  m = _BLOCK.match(path)
  if m:
    return int(m.group(1)) + 1
  if _STACKED.match(path):
    return None
  return num_layers + 1


def _check_layer_decay(decay):
  decay = float(decay)
  if not 0.0 < decay <= 1.0:
    raise errors.Error(
        f"optim.layer_decay={decay} must be in (0, 1] (0 disables it); "
        "SimMIM fine-tunes with 0.65-0.75")
  return decay


def _layer_mult(path, shape, decay, num_layers):
  """The multiplier of one leaf: a float, or an array for a stacked leaf."""
  lid = layer_id(path, num_layers)
  if lid is not None:
    return decay ** (num_layers + 1 - lid)
  if not shape or shape[0] != num_layers:
    raise errors.Error(
        f"{path} has shape {tuple(shape)}, expected a leading depth axis of "
        f"{num_layers} (the scanned encoder's blocks)")
  # Row i is block i, layer id i+1: decay ** (L - i).
  vec = np.array([decay ** (num_layers - i) for i in range(num_layers)],
                 np.float64)
  return vec.reshape((num_layers,) + (1,) * (len(shape) - 1))


def layer_decay_multipliers(tree, decay, num_layers=None):
  """Layer-wise lr multipliers `decay ** (L + 1 - layer_id)` per leaf.

  Args:
    tree: parameters (arrays or shapes).
    decay: the layer decay, in (0, 1].
    num_layers: L; inferred from `tree` when None.

  Returns:
    A tree like `tree` of Python floats, and for leaves of a scanned encoder
    float64 numpy arrays of shape (L, 1, ..., 1) (row i: decay ** (L - i)).
  """
  decay = _check_layer_decay(decay)
  if num_layers is None:
    num_layers = num_encoder_layers(tree)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: _layer_mult(path_str(p), tuple(getattr(x, "shape", ())),
                               decay, num_layers), tree)


def _scale_by_layer_decay(decay, num_layers):
  """Multiplies each update leaf by its layer-decay multiplier."""

  def update_fn(updates, state, params=None):
    del params

    def scale(keypath, u):
      m = _layer_mult(path_str(keypath), tuple(u.shape), decay, num_layers)
      if isinstance(m, float) and m == 1.0:
        return u
      return u * jnp.asarray(m, u.dtype)

    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(
      lambda _: optax.EmptyState(), update_fn)


SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(cfg, total_steps):
  """Learning-rate schedule: linear warmup then the configured decay."""
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  end_lr = float(cfg.get("end_lr", 0.0))
  name = cfg.schedule
  if name not in SCHEDULES:
    raise errors.Error(
        f"unknown schedule {name!r}: use {', '.join(SCHEDULES)}")
  if warmup >= total_steps and name != "constant":
    raise errors.Error(
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
    else:  # constant
      value = jnp.full_like(step, lr)
    if warmup > 0:
      value = value * jnp.minimum(1.0, (step + 1.0) / warmup)
    return value

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
    raise errors.Error(
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
  if cfg.get("layer_decay"):
    decay = _check_layer_decay(cfg.layer_decay)
    parts.append(_scale_by_layer_decay(decay, num_encoder_layers(params)))
  tx = optax.chain(*parts)

  frozen = regex_mask(params, cfg.get("frozen", ""))
  if any(jax.tree.leaves(frozen)):
    if all(jax.tree.leaves(frozen)):
      raise errors.Error(
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
