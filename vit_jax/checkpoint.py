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

import contextlib
import logging
import os
import re
import shutil
import sys
import traceback

import jax
import jax.numpy as jnp
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


class Damaged(Exception):
  """A checkpoint that cannot be used as it is on disk."""


def _leaf_name(path):
  """`a/b/0/c` for a key path of any pytree (dicts, lists, named tuples)."""
  return "/".join(str(getattr(e, "key", getattr(e, "idx", getattr(
      e, "name", e)))) for e in path)


def _leaves(tree):
  """{name: (shape, dtype)} of a tree of arrays, shape structs or orbax
  array metadata."""
  return {_leaf_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _bits(x):
  """uint32 words of `x` (any dtype up to 32 bits): its bit pattern."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize > 4:
    raise ValueError(f"cannot checksum {x.dtype} arrays")
  unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
  if x.dtype != unsigned:
    x = jax.lax.bitcast_convert_type(x, unsigned)
  return x.astype(jnp.uint32)


@jax.jit
def _checksums(tree):
  """A uint32 checksum per array: sum of its bit patterns times odd weights
  that depend on the position, mod 2^32.

  Integer sums wrap the same way in any order, so the value does not depend
  on the mesh, the sharding or the device count; any single flipped bit
  changes it (an odd weight is invertible mod 2^32).
  """
  def one(x):
    words = _bits(x)
    weights = jnp.arange(words.size, dtype=jnp.uint32).reshape(
        words.shape) * jnp.uint32(2) + jnp.uint32(0x9E3779B1)
    return jnp.sum(words * weights, dtype=jnp.uint32)

  return jax.tree.map(one, tree)


def checksums(state):
  """{leaf name: checksum} of a tree of (possibly sharded) jax arrays."""
  out = _checksums(state)
  return {_leaf_name(path): int(np.asarray(leaf.addressable_data(0)))
          for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]}


@contextlib.contextmanager
def _quiet_absl():
  """Orbax's absl warnings (read-only managers, an item directory without
  step metadata) are expected here and not shown."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


class _OrbaxFailuresToDebug(logging.Filter):
  """Orbax reports a failed background save (a full disk, say) from each of
  its threads: absl errors with tracebacks, and asyncio's "Task (or Future)
  exception was never retrieved" for every array and file. The Manager
  raises one Error naming the cause instead; these records go to the debug
  level."""

  def filter(self, record):
    if record.levelno < logging.ERROR or not _from_orbax(record):
      return True
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _from_orbax(record):
  """Whether a log record comes from orbax: logged by it, or (asyncio's
  reports of an exception nobody retrieved) naming it or raised through it."""
  inside = f"{os.sep}orbax{os.sep}"
  if inside in record.pathname or "orbax" in record.getMessage():
    return True
  tb = record.exc_info[2] if record.exc_info else None
  return tb is not None and any(inside in frame.filename
                                for frame in traceback.extract_tb(tb))


def _unraisable_hook(previous):
  """sys.unraisablehook without the reports of tensorstore's callbacks into
  the event loops orbax has closed after a failed save ("Event loop is
  closed"); everything else goes to `previous`."""

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook.quiets_orbax = True
  return hook


def _quiet_orbax_failures():
  """Installs the two filters above, once per process."""
  if getattr(sys.unraisablehook, "quiets_orbax", False):
    return
  sys.unraisablehook = _unraisable_hook(sys.unraisablehook)
  quiet = _OrbaxFailuresToDebug()
  logging.getLogger("absl").addFilter(quiet)
  logging.getLogger("asyncio").addFilter(quiet)


def _item_handlers(state_handler=ocp.StandardCheckpointHandler):
  return {"state": state_handler(), "data": ocp.JsonCheckpointHandler()}


def _read_only_manager(directory):
  """An orbax manager that lists the checkpoints of `directory` and reads
  their state as numpy arrays."""
  _quiet_orbax_failures()
  with _quiet_absl():
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers=_item_handlers(ocp.PyTreeCheckpointHandler))


class Manager:
  """Saves and restores training state in DIR/checkpoints.

  Each checkpoint carries a checksum of every array it holds (in its `data`
  item, beside the data iterator state), which `restore_latest` verifies.
  """

  def __init__(self, workdir, max_to_keep=3, log=print):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._corrupt_dir = os.path.abspath(
        os.path.join(workdir, "corrupt_checkpoints"))
    self._log = log
    self._last_saved = None
    _quiet_orbax_failures()
    self._mngr = ocp.CheckpointManager(
        self.directory,
        # A write cut short by a kill leaves orbax's temporary directory;
        # one process owns the workdir (WorkdirLock), so it goes at start.
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=True, cleanup_tmp_directories=True),
        item_handlers=_item_handlers())

  def all_steps(self):
    return list(self._mngr.all_steps())

  def _write_error(self, step, error):
    """The one-line Error for a checkpoint that could not be written."""
    kept = self._mngr.latest_step()
    if kept is not None and kept == step:
      kept = max((s for s in self._mngr.all_steps() if s != step),
                 default=None)
    intact = (f"the checkpoint at step {kept} is intact" if kept is not None
              else "no earlier checkpoint exists")
    return errors.Error(
        f"cannot write the checkpoint at step {step} to {self.directory} "
        f"({errors.first_line(error, 300)}); {intact}: free space on that "
        "disk or pass another --workdir")

  def save(self, step, state, data_state):
    """Starts an asynchronous save of `state` (pytree) and `data_state`
    (JSON-able dict), with the checksums of `state`'s arrays."""
    data_state = dict(data_state, checksums=checksums(state))
    try:
      self._mngr.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      # An earlier asynchronous save may be the one that failed.
      raise self._write_error(self._last_saved or step, e) from None
    self._last_saved = int(step)

  def wait(self):
    """Blocks until pending saves are durable on disk."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._last_saved, e) from None

  def close(self):
    try:
      self.wait()
    finally:
      self._mngr.close()

  def restore_latest(self, abstract_state, check_data=None, fresh_start=False):
    """Restores the newest checkpoint that reads back whole.

    A checkpoint whose structure differs from `abstract_state` (another
    model, optimizer or EMA setting) is an Error naming what differs, and
    nothing is moved. A damaged one (unreadable metadata or arrays, a
    checksum that does not match, a data state that `check_data` refuses
    with anything but an Error) is moved to DIR/corrupt_checkpoints (nothing
    is deleted), and the previous one is tried.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings.
      check_data: optional callable(data_state) that raises for a data
        state it cannot use (errors.Error: incompatible; else damaged).
      fresh_start: with no usable checkpoint left where damaged ones were
        found (now or by an earlier run), return None instead of raising.

    Returns:
      (step, state, data_state), or None when there is no checkpoint.
    """
    expected = _leaves(abstract_state)
    problems = []
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        with _quiet_absl():
          stored = _leaves(self._mngr.metadata(step).item_metadata[
              "state"].tree)
      except Exception as e:  # pylint: disable=broad-except
        problems.append(self._set_aside(step, e))
        continue
      _check_compatible(stored, expected, step, self.directory)
      try:
        with _quiet_absl():
          restored = self._mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=ocp.args.JsonRestore()))
        state, data_state = restored["state"], dict(restored["data"])
        _verify(state, data_state.pop("checksums", None))
        if check_data is not None:
          check_data(data_state)
      except errors.Error:
        raise
      except Exception as e:  # pylint: disable=broad-except
        problems.append(self._set_aside(step, e))
        continue
      return step, state, data_state
    set_aside = (sorted(os.listdir(self._corrupt_dir))
                 if os.path.isdir(self._corrupt_dir) else [])
    if set_aside and not fresh_start:
      found = "; ".join(problems) if problems else (
          "earlier runs set aside step(s) " + ", ".join(set_aside))
      raise errors.Error(
          f"no usable checkpoint is left in {self.directory} ({found}; "
          f"damaged ones are in {self._corrupt_dir}): pass "
          "--config.fresh_start=True to train from step 0 in this workdir, "
          "or pass a new --workdir")
    return None

  def _set_aside(self, step, error):
    """Moves a damaged checkpoint out of the manager's directory; returns
    what was wrong, in a few words."""
    dest, n = os.path.join(self._corrupt_dir, str(step)), 0
    while os.path.exists(dest):  # Set aside before: both are kept.
      n += 1
      dest = os.path.join(self._corrupt_dir, f"{step}.{n}")
    cause = errors.first_line(error, 300)
    self._log(f"checkpoint at step {step} is damaged ({cause}); moved it to "
              f"{dest} and falling back to the previous one")
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._mngr.reload()
    return f"step {step}: {cause}"


def _verify(state, expected):
  """Raises Damaged when the arrays' checksums differ from the stored ones
  (checkpoints written before checksums were kept are not verified)."""
  if expected is None:
    return
  actual = checksums(state)
  wrong = sorted(k for k in set(actual) | set(expected)
                 if actual.get(k) != expected.get(k))
  if wrong:
    raise Damaged(f"checksum mismatch in {len(wrong)} array(s): "
                  + ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))


def _check_compatible(stored, expected, step, directory):
  """A readable checkpoint of another structure is an Error naming what
  differs (model, optimizer, EMA) and the fix.

  The optimizer state and the EMA follow the parameters' shapes: they are
  named only where the parameters agree.
  """
  if stored == expected:
    return

  def part(tree, name):
    return {k: v for k, v in tree.items() if k.split("/")[0] == name}

  def differ(name):
    return part(stored, name) != part(expected, name)

  s_ema, e_ema = part(stored, "ema"), part(expected, "ema")
  if differ("params"):
    s, e = part(stored, "params"), part(expected, "params")
    shown = [f"{k[len('params/'):]} {s[k][0] if k in s else 'absent'} vs "
             f"{e[k][0] if k in e else 'absent'}"
             for k in sorted(set(s) | set(e)) if s.get(k) != e.get(k)]
    what, detail, fix = "model", (
        f"{len(shown)} parameter(s) differ, checkpoint vs model: "
        + ", ".join(shown[:3]) + (" ..." if len(shown) > 3 else "")), (
            "--config.model_name, --config.model.*, the image size and the "
            "classes")
  elif bool(s_ema) != bool(e_ema):
    what, detail, fix = "EMA", (
        f"the checkpoint {'has' if s_ema else 'has no'} EMA parameters, this "
        f"config {'keeps' if e_ema else 'keeps none'}"), (
            "--config.optim.ema_decay")
  elif differ("opt_state"):
    what, detail, fix = "optimizer", (
        f"its optimizer state has {len(part(stored, 'opt_state'))} arrays, "
        f"this config's {len(part(expected, 'opt_state'))}"), (
            "--config.optim.name and its options")
  else:
    names = sorted(k for k in set(stored) | set(expected)
                   if stored.get(k) != expected.get(k))
    what, detail, fix = "state", "differs in " + ", ".join(names[:3]), (
        "the config")
  raise errors.Error(
      f"the checkpoint at step {step} in {directory} was written with another "
      f"{what} config ({detail}): resume with the {fix} it was trained with, "
      "or pass a new --workdir")


def _restore_numpy(mngr, step):
  """Reads a checkpoint's state item as numpy arrays (no mesh needed)."""
  with _quiet_absl():
    meta = mngr.metadata(step).item_metadata["state"].tree
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=meta, restore_args=restore_args)))[
            "state"]


def latest_state(workdir):
  """The newest readable checkpoint of a training workdir, as numpy.

  Returns:
    (step, state): the state's "params", "opt_state", "rng", "step" (and
    "ema") as numpy arrays.
  """
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = []
  if os.path.isdir(ckpt_dir):
    mngr = _read_only_manager(ckpt_dir)
    steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise errors.Error(f"no checkpoint in {ckpt_dir}: train first")
  problems = []
  for step in steps:
    try:
      return step, _restore_numpy(mngr, step)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"step {step}: {errors.first_line(e, 300)}")
  raise errors.Error(
      f"no readable checkpoint in {ckpt_dir}: " + "; ".join(problems))


def latest_params(workdir, use_ema=False, with_step=False):
  """Newest parameters of a training workdir, as numpy, and its config.

  Args:
    workdir: a directory written by `python -m vit_jax.main`.
    use_ema: return the Polyak-averaged parameters (when they were kept).
    with_step: also return the step of the checkpoint read.

  Returns:
    (params, config): a nested dict of numpy arrays in the layout it was
    trained in, and the resolved ConfigDict from DIR/config.json; with
    `with_step`, (params, config, step).
  """
  workdir = os.path.abspath(workdir)
  config = config_utils.load_config(workdir)
  step, state = latest_state(workdir)
  if use_ema:
    if "ema" not in state:
      raise errors.Error(
          f"{workdir} has no EMA parameters (optim.ema_decay was 0)")
  params = state["ema" if use_ema else "params"]
  return (params, config, step) if with_step else (params, config)


def model_from_workdir(workdir, use_ema=False, with_step=False):
  """Newest parameters of a training workdir and the model they fit.

  Returns:
    (params, model, config): numpy parameters in the layout they were
    trained in, the VisionTransformer the run trained (with the fields
    resolved at training time: task fields, image size, channels) and the
    run's ConfigDict; with `with_step`, (params, model, config, step), the
    step of the checkpoint read.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  params, config, step = latest_params(workdir, use_ema=use_ema,
                                       with_step=True)
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
  return (params, model, config, step) if with_step else (params, model,
                                                          config)


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
