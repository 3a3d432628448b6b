"""Checkpoints: orbax manager for resuming, and parameters for fine-tuning.

A training workdir holds `DIR/checkpoints/<step>/` written by an orbax
`CheckpointManager`, each with two items:

- `state`: {"params", "opt_state", "ema" (when Polyak averaging is on),
  "rng", "step"} as sharded jax arrays (restored onto any mesh),
- `data`: JSON with the data iterator state and the step.

`latest_params(workdir)` gives the newest parameters as numpy, in the layout
they were trained in (per-block `encoderblock_{i}`, or stacked
`encoderblock` when the model used `scan=True`; `npz.unstack_blocks`
converts), together with the resolved config from `DIR/config.json`.

`load_init(...)` prepares fine-tuning: parameters from a published-layout
`.npz` or a workdir, position embeddings (and posemb="relative" bias tables)
resampled to the new grid, head reset to zeros, "don't load" regexes skipped.
Fine-tuning from a masked-image-modeling (SimMIM) run drops its decoder and
mask token explicitly (`split_unused`).
"""

import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax import config_utils
from vit_jax import errors
from vit_jax import npz


# Published-layout .npz files and `/`-joined flat trees (see `vit_jax.npz`).
load_npz = npz.load_npz
save_npz = npz.save_npz
flatten = npz.flatten
unflatten = npz.unflatten


def _first_line(e):
  lines = [l for l in str(e).strip().splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


class Manager:
  """Saves and restores training state in DIR/checkpoints."""

  def __init__(self, workdir, max_to_keep=3, log=print):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._corrupt_dir = os.path.abspath(
        os.path.join(workdir, "corrupt_checkpoints"))
    self._log = log
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True),
        item_names=("state", "data"))

  def all_steps(self):
    return list(self._mngr.all_steps())

  def save(self, step, state, data_state):
    """Starts an asynchronous save of `state` (pytree) and `data_state`."""
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state)), force=True)

  def wait(self):
    """Blocks until pending saves are durable on disk."""
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  def restore_latest(self, abstract_state):
    """Restores the newest readable checkpoint.

    A checkpoint that cannot be read is moved to DIR/corrupt_checkpoints
    (nothing is deleted) and the previous one is tried.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings.

    Returns:
      (step, state, data_state), or None when there is no checkpoint.
    """
    expected = {k: tuple(v.shape) for k, v in flatten(
        abstract_state["params"]).items()}
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        stored = self._param_shapes(step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      _check_compatible(stored, expected, step, self.directory)
      try:
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      return step, restored["state"], restored["data"]
    return None

  def _param_shapes(self, step):
    """{path: shape} of the parameters stored at `step` (metadata only)."""
    _check_files(os.path.join(self.directory, str(step)))
    path = os.path.join(self.directory, str(step), "state")
    with ocp.PyTreeCheckpointer() as checkpointer:
      tree = checkpointer.metadata(path).item_metadata.tree
    return {k: tuple(v.shape) for k, v in flatten(tree["params"]).items()}

  def _set_aside(self, step, error):
    """Moves an unreadable checkpoint out of the manager's directory."""
    dest = os.path.join(self._corrupt_dir, str(step))
    self._log(f"checkpoint at step {step} is unreadable ({_first_line(error)})"
              f"; moved it to {dest} and falling back to the previous one")
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir, exist_ok=True)
      if os.path.exists(dest):
        shutil.rmtree(dest)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._mngr.reload()


def _check_files(step_dir):
  """Cheap structural checks of a step directory before tensorstore reads."""
  state = os.path.join(step_dir, "state")
  with open(os.path.join(state, "_METADATA")) as f:
    json.load(f)
  for name in os.listdir(os.path.join(step_dir, "data")):
    if name.endswith(".json") or "." not in name:
      path = os.path.join(step_dir, "data", name)
      if os.path.isfile(path):
        with open(path) as f:
          json.load(f)
  with open(os.path.join(state, "_METADATA")) as f:
    if json.load(f).get("use_ocdbt", True):
      manifest = os.path.join(state, "manifest.ocdbt")
      if not os.path.isfile(manifest) or not os.path.getsize(manifest):
        raise FileNotFoundError(f"{manifest} is missing or empty")


def _check_compatible(stored, expected, step, directory):
  """A readable checkpoint written by another model config is an error."""
  if stored == expected:
    return
  diffs = [f"{k}: checkpoint {stored.get(k)}, model {expected.get(k)}"
           for k in sorted(set(stored) | set(expected))
           if stored.get(k) != expected.get(k)]
  raise errors.Error(
      f"the checkpoint at step {step} in {directory} was written with another "
      f"model config ({'; '.join(diffs[:3])}"
      f"{' ...' if len(diffs) > 3 else ''}): resume with the config it was "
      "trained with, or pass a new --workdir")


def _restore_numpy(step_dir):
  """Reads a checkpoint's state item as numpy arrays (no mesh needed)."""
  # Orbax reads by absolute path only: given a relative one, its metadata()
  # swallows the refusal and returns no tree.
  path = os.path.abspath(os.path.join(step_dir, "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  # The step's _CHECKPOINT_METADATA is one level up, in the step directory;
  # orbax warns that the item directory has none, which is expected here.
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(max(level, logging.ERROR))
  try:
    meta = checkpointer.metadata(path).item_metadata.tree
  finally:
    absl_logger.setLevel(level)
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args))


def latest_params(workdir, use_ema=False):
  """Newest parameters of a training workdir, as numpy, and its config.

  Args:
    workdir: a directory written by `python -m vit_jax.main`.
    use_ema: return the Polyak-averaged parameters (when they were kept).

  Returns:
    (params, config): a nested dict of numpy arrays in the layout it was
    trained in, and the resolved ConfigDict from DIR/config.json.
  """
  config = config_utils.load_config(workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = []
  if os.path.isdir(ckpt_dir):
    steps = sorted((int(d) for d in os.listdir(ckpt_dir) if d.isdigit()),
                   reverse=True)
  if not steps:
    raise errors.Error(f"no checkpoint in {ckpt_dir}: train first")
  problems = []
  for step in steps:
    try:
      state = _restore_numpy(os.path.join(ckpt_dir, str(step)))
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"step {step}: {_first_line(e)}")
      continue
    if use_ema:
      if "ema" not in state:
        raise errors.Error(
            f"{workdir} has no EMA parameters (optim.ema_decay was 0)")
      return state["ema"], config
    return state["params"], config
  raise errors.Error(
      f"no readable checkpoint in {ckpt_dir}: " + "; ".join(problems))


def model_from_workdir(workdir, use_ema=False):
  """Newest parameters of a training workdir and the model they fit.

  Returns:
    (params, model, config): numpy parameters in the layout they were
    trained in, the VisionTransformer the run trained (with the fields
    resolved at training time: task fields, image size, channels) and the
    run's ConfigDict.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  params, config = latest_params(workdir, use_ema=use_ema)
  resolved = config.get("resolved") or {}
  kwargs = dict(resolved.get("model_kwargs") or {})
  if not kwargs:  # Written before the resolved fields were kept.
    kwargs = {k: v for k, v in dict(config.get("model") or {}).items()
              if v is not None}
    for key in ("num_classes", "image_size", "num_channels"):
      value = resolved.get(key)
      if value is None and key != "num_classes":
        value = config.get(key)  # The training resolution and channels.
      if value is not None:
        kwargs[key] = value
  try:
    model = models.create(config.model_name, **kwargs)
  except ValueError as e:
    raise errors.Error(f"cannot rebuild the model of {workdir}: {e}") from None
  return params, model, config


# Fine-tuning initialisation.


def _is_stacked(flat):
  return any(k.startswith("Transformer/encoderblock/") for k in flat)


def _is_unstacked(flat):
  return any(k.startswith("Transformer/encoderblock_") for k in flat)


def _read_init(path):
  """Parameters to initialise from: an .npz file or a training workdir."""
  if os.path.isdir(path):
    return latest_params(path)[0]
  if not os.path.exists(path):
    raise errors.Error(
        f"init checkpoint {path} not found: pass an .npz file or a workdir "
        "to --config.init")
  try:
    return load_npz(path)
  except (ValueError, OSError) as e:
    raise errors.Error(
        f"cannot read init checkpoint {path}: {e}") from None


def _match_layout(source, target_flat):
  """Converts the source between stacked and per-block encoder layouts."""
  flat = flatten(source)
  if _is_stacked(target_flat) and _is_unstacked(flat):
    return flatten(npz.stack_blocks(source))
  if _is_unstacked(target_flat) and _is_stacked(flat):
    return flatten(npz.unstack_blocks(source))
  return flat


# What the parameter shapes say about the model: (name in messages, model
# field, regex of the parameter read, how its shape gives the value). Read off
# the layout the model uses (per-block or stacked, see `_match_layout`).
_STRUCTURE = (
    ("width", "hidden_size",
     r"^(Transformer/encoder_norm/scale|embedding/bias|cls)$",
     lambda shape: shape[-1]),
    ("heads", "num_heads",
     r"^Transformer/encoderblock(_0)?/MultiHeadDotProductAttention_1/query/"
     r"kernel$", lambda shape: shape[-2]),
    ("MLP width", "mlp_dim",
     r"^Transformer/encoderblock(_0)?/MlpBlock_3/Dense_0/kernel$",
     lambda shape: shape[-1]),
    ("patch size", "patch_size", r"^embedding/kernel$",
     lambda shape: shape[0] if shape[0] == shape[1] else tuple(shape[:2])),
)


def _depth(flat):
  """Number of encoder blocks of a flat tree (per-block or stacked)."""
  stacked = flat.get("Transformer/encoderblock/LayerNorm_0/scale")
  if stacked is not None:
    return np.shape(stacked)[0]
  blocks = {m.group(1) for m in (
      re.match(r"^Transformer/encoderblock_(\d+)/", k) for k in flat) if m}
  return len(blocks) or None


def _structure_differences(source, target, skipped):
  """[(field, "width 32, the model 16 (--config.model.hidden_size)"), ...].

  Only parameters that are loaded are read (`skipped(key)`: a "don't load"
  entry).
  """
  diffs = []
  for what, field, pattern, read in _STRUCTURE:
    keys = sorted(k for k in target
                  if re.match(pattern, k) and k in source and not skipped(k))
    if keys:
      ours, theirs = read(np.shape(target[keys[0]])), read(
          np.shape(source[keys[0]]))
      if ours != theirs:
        diffs.append((field, f"{what} {theirs}, the model {ours} "
                             f"(--config.model.{field})"))
  ours, theirs = _depth(target), _depth(source)
  if ours and theirs and ours != theirs:
    diffs.append(("num_layers", f"depth {theirs}, the model {ours} "
                                "(--config.model.num_layers)"))
  return diffs


def _check_structure(source, target, skipped, path, depth=False):
  """errors.Error naming the width, heads, ... in which the init checkpoint
  differs from the model, when it does.

  A depth of its own is no error unless `depth` (per-block checkpoints load
  the blocks both have); with another difference it is named too.
  """
  diffs = _structure_differences(source, target, skipped)
  if depth or any(field != "num_layers" for field, _ in diffs):
    if diffs:
      raise errors.Error(
          f"init checkpoint {path} has {'; '.join(t for _, t in diffs)}: "
          "set the model fields to the checkpoint's (or its variant with "
          "--config.model_name)")


def _resample_posemb(key, value, target, grid, prefix, resample, path):
  """Position embeddings resampled to the model's grid."""
  n_old, n_new = value.shape[1], target.shape[1]
  if not resample:
    raise errors.Error(
        f"checkpoint has {n_old} positions, model expects {n_new}: pass "
        "--config.resample_posemb")
  side = int(round((n_old - prefix) ** 0.5))
  if side * side != n_old - prefix:
    raise errors.Error(
        f"{key} in {path} has {n_old} positions, not {prefix} prefix tokens "
        "plus a square grid: cannot resample it")
  from vit_jax import posemb  # pylint: disable=g-import-not-at-top
  return np.asarray(posemb.resample(
      np.asarray(value), (side, side), tuple(grid), prefix, method="zoom"))


def _resample_relative(key, value, target, grid, prefix, resample, path):
  """Relative position tables [..., size, heads] resampled to the grid."""
  n_old, n_new = value.shape[-2], target.shape[-2]
  if not resample:
    raise errors.Error(
        f"{key} in {path} has {n_old} relative positions, model expects "
        f"{n_new}: pass --config.resample_posemb")
  from vit_jax import posemb  # pylint: disable=g-import-not-at-top
  old_grid = posemb.relative_square_grid(n_old, prefix)
  if old_grid is None:
    raise errors.Error(
        f"{key} in {path} has {n_old} relative positions, not (2s - 1)**2 + "
        f"{posemb.relative_extra(prefix)} of a square grid: cannot resample it")
  return np.asarray(posemb.resample_relative(
      np.asarray(value, np.float32), old_grid, tuple(grid), prefix,
      "bilinear"))


# Parameters only a masked-image-modeling (SimMIM) model has.
_MIM_ONLY = re.compile(r"^(decoder/.+|mask_token)$")


def split_unused(source_keys, target_keys):
  """Checkpoint entries the model has no place for, split by kind.

  Args:
    source_keys: flat (`/`-joined) names in the checkpoint.
    target_keys: flat names of the model's parameters.

  Returns:
    (mim_dropped, other_unused): sorted lists. `mim_dropped` holds the
    masked-image-modeling decoder (`decoder/*`) and `mask_token` when the
    model has none of them (fine-tuning from a SimMIM run); `other_unused`
    every other checkpoint entry the model does not have.
  """
  target = set(target_keys)
  has_decoder = any(k.startswith("decoder/") for k in target)
  mim, other = [], []
  for key in sorted(set(source_keys) - target):
    if key == "mask_token" and "mask_token" not in target:
      mim.append(key)
    elif key.startswith("decoder/") and not has_decoder:
      mim.append(key)
    else:
      other.append(key)
  return mim, other


def load_init(init_params, config, grid, log=print, report=None):
  """Merges checkpoint parameters into freshly initialised ones.

  Args:
    init_params: the model's random initialisation (nested dict, numpy or
      jax arrays).
    config: the experiment config (init, init_head, resample_posemb,
      dont_load).
    grid: the model's patch grid (h, w).
    log: where to report what was not loaded.
    report: optional dict, filled with sorted lists of names: "kept" (random
      init kept), "mim_dropped" (masked-image-modeling decoder and mask
      token dropped, see `split_unused`) and "ignored" (other checkpoint
      entries the model does not have).

  Returns:
    A nested dict of numpy arrays shaped like `init_params`.
  """
  path = config.init
  target = {k: np.asarray(v) for k, v in flatten(init_params).items()}
  source = _match_layout(_read_init(path), target)
  dont_load = [re.compile(r) for r in (config.get("dont_load") or ())]

  def skipped(key):
    return any(r.search(key) for r in dont_load)

  _check_structure(source, target, skipped, path)
  prefix = 1 if "cls" in target else 0
  out, kept, mismatched = {}, [], []
  for key, init in target.items():
    if skipped(key):
      out[key] = init
      kept.append(key)
      continue
    if key.startswith("head/"):
      value = source.get(key)
      if (value is None or not config.get("init_head", True)
          or value.shape != init.shape):
        out[key] = np.zeros_like(init)
        continue
    value = source.get(key)
    if value is None:
      out[key] = init
      kept.append(key)
      continue
    value = np.asarray(value)
    if (key.endswith("pos_embedding") and value.shape != init.shape
        and value.shape[::2] == init.shape[::2]):  # Only positions differ.
      value = _resample_posemb(key, value, init, grid, prefix,
                               config.get("resample_posemb"), path)
    if (key.endswith(npz.RELATIVE_BIAS) and value.ndim == init.ndim
        and value.shape[-2] != init.shape[-2]):
      value = _resample_relative(key, value, init, grid, prefix,
                                 config.get("resample_posemb"), path)
    if value.shape != init.shape:
      mismatched.append(f"{key}: checkpoint {value.shape}, model {init.shape}")
      continue
    out[key] = value.astype(init.dtype)
  if mismatched:
    _check_structure(source, target, skipped, path, depth=True)
    raise errors.Error(
        f"{len(mismatched)} parameter shapes in {path} do not fit the model "
        f"({'; '.join(mismatched)}): check --config.model_name and "
        "--config.model.*, or skip them with --config.dont_load")
  if len(kept) == len(target):
    raise errors.Error(
        f"no parameter of {path} matches the model: is it a ViT checkpoint?")
  mim_dropped, unused = split_unused(source, target)
  if report is not None:
    report.update(kept=sorted(kept), mim_dropped=mim_dropped, ignored=unused)
  if kept:
    log(f"init: kept the random initialisation of {len(kept)} parameters: "
        + ", ".join(kept[:8]) + (" ..." if len(kept) > 8 else ""))
  if mim_dropped:
    what = " and ".join(
        name for name, present in (
            ("decoder", any(k.startswith("decoder/") for k in mim_dropped)),
            ("mask token", "mask_token" in mim_dropped)) if present)
    log(f"init: dropped the masked-image-modeling {what} ("
        + ", ".join(mim_dropped) + ")")
  if unused:
    log(f"init: ignored {len(unused)} checkpoint entries: "
        + ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))
  return unflatten(out)
