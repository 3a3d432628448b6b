"""The training loop, read top to bottom.

config -> mesh -> data -> model & optimizer -> shardings -> update step ->
restore (or initialise) -> evaluators -> loop (log, evaluate, checkpoint).

The whole update is one `jax.jit` with explicit shardings over the mesh;
parameters and optimizer state are donated. Per-step randomness is
`fold_in(rng, step)`, and the data iterator position is checkpointed, so a
resumed run continues exactly where the interrupted one stopped.
"""

import functools
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import config_utils
from vit_jax import data
from vit_jax import losses
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax.evaluators import classification

Error = config_utils.Error


class StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves a checkpoint and exits."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def install(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not in the main thread.
        pass

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def is_set(self):
    """Agreed over all processes (a signal may reach only some of them)."""
    flag = self.signum is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flag = bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def _prepare_workdir(workdir):
  """Creates the workdir; a one-line error if it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise Error(f"cannot write to workdir {workdir} ({e.strerror or e}): "
                "pass a writable --workdir") from None


def _get_source(config, split):
  try:
    return data.get_source(config.dataset, split,
                           data_dir=config.get("data_dir"))
  except (ValueError, KeyError, FileNotFoundError, NotADirectoryError,
          ImportError) as e:
    msg = e.args[0] if e.args else str(e)
    raise Error(f"cannot load dataset {config.dataset!r} split {split!r}: "
                f"{msg}") from None


def _train_loader(config, source, image_size):
  """This process's share of one global stream of training batches."""
  pp = config.pp
  return data.train_loader(
      source, int(config.batch_size), image_size, seed=int(config.seed),
      process_index=jax.process_index(), process_count=jax.process_count(),
      inception_crop=pp.get("inception_crop", True),
      crop_area=tuple(pp.get("crop_area", (0.05, 1.0))),
      flip=pp.get("flip", True), num_channels=config.get("num_channels"),
      worker_count=int(pp.get("worker_count", 0)))


def _create_model(config, num_classes, image_size, num_channels, **extra):
  """The VisionTransformer of the config; checks variant and image size."""
  if config.model_name not in models.VARIANTS:
    raise Error(f"unknown model variant {config.model_name!r}: use one of "
                f"{', '.join(models.VARIANTS)} (--config.model_name)")
  kwargs = dict(config.model.to_dict() if config.get("model") else {})
  kwargs.update(num_classes=num_classes, image_size=image_size,
                num_channels=num_channels, **extra)
  try:
    model = models.create(config.model_name, **kwargs)
    grid = model.grid_size(image_size)
  except ValueError as e:
    raise Error(str(e)) from None
  return model, grid, kwargs


def _loss_fn(config, num_classes):
  """(logits, int labels) -> mean loss, with label smoothing."""
  smoothing = float(config.get("label_smoothing") or 0.0)
  kind = config.get("loss", "softmax_xent")
  if kind not in ("softmax_xent", "sigmoid_xent"):
    raise Error(f"unknown loss {kind!r}: use softmax_xent or sigmoid_xent")

  def loss(logits, labels):
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if smoothing:
      onehot = onehot * (1.0 - smoothing) + smoothing / num_classes
    return getattr(losses, kind)(logits, onehot)

  return loss


def _with_shardings(shapes, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def _put(tree, shardings):
  """Host numpy tree (same on every process) -> global sharded arrays."""
  return jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(
          np.shape(x), sh, lambda idx, x=x: np.asarray(x)[idx]),
      tree, shardings)


def _check_finite(pending):
  """Fetches per-step metrics; raises Error at the first non-finite step."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    loss, gnorm = float(m["train/loss"]), float(m["train/grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      what = "loss" if not np.isfinite(loss) else "gradient norm"
      raise Error(
          f"{what} is {loss if what == 'loss' else gnorm} at step {step}; "
          "the last good checkpoint is kept. Try a lower --config.optim.lr, "
          "float32 compute (--config.model.dtype=float32) or gradient "
          "clipping (--config.optim.clip_norm=1)")
  return [(s, {k: float(v) for k, v in m.items()})
          for (s, _), m in zip(pending, fetched)]


def _natural(name):
  """Sort key with numbers compared as numbers ("5shot" < "10shot")."""
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _every(step, period):
  return bool(period) and period > 0 and step % period == 0


def _fewshot_steps(config):
  """Few-shot evaluation period (0: at the end), or None when disabled."""
  if not config.get("fewshot"):
    return None
  steps = config.fewshot.get("log_steps")
  steps = 0 if steps is None else int(steps)
  return None if steps < 0 else steps


def train_and_evaluate(config, workdir, devices=None):
  """Trains, evaluates and checkpoints; resumes from DIR when possible.

  Args:
    config: the experiment ConfigDict (see `config_utils.default_config`).
    workdir: directory for checkpoints, metrics.jsonl, tb/ and config.json.
    devices: devices of the mesh (default: all of them).

  Returns:
    The metrics of the final evaluation (dict).
  """
  # Config and workdir.
  _prepare_workdir(workdir)
  image_size = config_utils.as_tuple2(config.image_size)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.get("eval_batch_size") or batch_size)

  # Mesh.
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(batch_size, mesh, "batch_size")
  sharding.check_batch_size(eval_batch_size, mesh, "eval_batch_size")

  # Data.
  train_src = _get_source(config, config.train_split)
  total_steps = config_utils.resolve_steps(config, len(train_src))
  num_classes = int(train_src.num_classes)
  train_iter = iter(_train_loader(config, train_src, image_size))
  num_channels = config.get("num_channels") or int(
      np.asarray(train_src[0]["image"]).shape[-1])

  # Model and optimizer.
  model, grid, model_kwargs = _create_model(
      config, num_classes, image_size, num_channels)
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, *image_size, num_channels), jnp.float32)

  def init_params(rng):
    return model.init({"params": rng}, dummy, train=False)["params"]

  param_shapes = jax.eval_shape(init_params, rng)
  tx, schedule = optim.make(config.optim, param_shapes, total_steps)
  ema_decay = float(config.optim.get("ema_decay") or 0.0)
  accum = int(config.optim.get("accum_steps") or 1)
  if batch_size % (accum * mesh.shape["data"]):
    raise Error(f"batch_size={batch_size} is not divisible by accum_steps="
                f"{accum} times the {mesh.shape['data']} data devices")
  loss_fn = _loss_fn(config, num_classes)

  def make_state(params, rng):
    state = {"params": params, "opt_state": tx.init(params),
             "rng": rng, "step": jnp.zeros((), jnp.int32)}
    if ema_decay:
      state["ema"] = params
    return state

  # Shardings.
  state_shapes = jax.eval_shape(make_state, param_shapes, rng)
  state_shardings = sharding.shardings_from_config(state_shapes, mesh, config)
  param_shardings = state_shardings["params"]
  repl = sharding.replicated(mesh)
  batch_shard = sharding.batch_sharding(mesh)

  # Update step.
  def train_step(state, batch):
    params, step = state["params"], state["step"]
    step_rng = jax.random.fold_in(state["rng"], step)

    def loss_of(p, images, labels, r):
      logits, _ = model.apply({"params": p}, images, train=True,
                              rngs={"dropout": r})
      return loss_fn(logits, labels)

    grad_fn = jax.value_and_grad(loss_of)
    if accum == 1:
      loss, grads = grad_fn(params, batch["image"], batch["label"], step_rng)
    else:
      def micro(x):  # [B, ...] -> [accum, B / accum, ...], rows interleaved.
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      images, labels = micro(batch["image"]), micro(batch["label"])

      def body(i, carry):
        loss_sum, grad_sum = carry
        l, g = grad_fn(params, images[i], labels[i],
                       jax.random.fold_in(step_rng, i))
        return loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)

      zeros = jax.tree.map(jnp.zeros_like, params)
      loss, grads = jax.lax.fori_loop(0, accum, body, (0.0, zeros))
      loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = dict(state, params=new_params, opt_state=opt_state,
                     step=step + 1)
    if ema_decay:
      new_state["ema"] = optim.ema_update(state["ema"], new_params,
                                          ema_decay, step)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": schedule(step)}
    return new_state, metrics

  train_step = jax.jit(
      train_step, in_shardings=(state_shardings, batch_shard),
      out_shardings=(state_shardings, repl), donate_argnums=(0,))

  log = print if jax.process_index() == 0 else (lambda *a, **k: None)

  # Restore, or initialise (from scratch or from config.init).
  ckpt = checkpoint.Manager(workdir, max_to_keep=config.max_to_keep, log=log)
  restored = ckpt.restore_latest(_with_shardings(state_shapes,
                                                 state_shardings))
  if restored is not None:
    start_step, state, data_state = restored
    data.set_state(train_iter, data_state["data"])
    log(f"resumed from the checkpoint at step {start_step}")
  else:
    start_step = 0
    if config.get("init"):
      random_params = sharding.to_numpy(jax.jit(init_params)(rng))
      params = checkpoint.load_init(random_params, config, grid, log=log)
      params = _put(params, param_shardings)
    else:
      params = jax.jit(init_params, out_shardings=param_shardings)(rng)
    state = jax.jit(make_state, out_shardings=state_shardings)(params, rng)

  # The resolved config, once the checkpoint (if any) is known to fit it.
  if jax.process_index() == 0:
    config_utils.save_config(config, workdir, extra={"resolved": dict(
        total_steps=total_steps, num_classes=num_classes,
        image_size=list(image_size), num_channels=num_channels,
        model_kwargs=model_kwargs)})

  # Evaluators.
  evaluators = [(config.eval_steps, "", classification.from_config(
      config, model, mesh))]
  fewshot_steps = _fewshot_steps(config)
  if fewshot_steps is not None:
    from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
    evaluators.append((fewshot_steps, "",
                       fewshot.from_config(config.fewshot, model, mesh)))

  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    progress=config.get("progress", True))

  def evaluate(step, final=False):
    results = {}
    for period, _, evaluator in evaluators:
      if not (final or _every(step, period)):
        continue
      results.update(evaluator.run(state["params"]))
      if ema_decay:
        results.update({f"ema/{k}": v
                        for k, v in evaluator.run(state["ema"]).items()})
    if results:
      writer.write(step, results)
      for prefix in ("", "ema/"):
        acc = results.get(f"{prefix}eval/accuracy")
        if acc is not None:
          writer.print(
              f"step {step}: {prefix}eval/accuracy={acc:.4f} "
              f"({int(results[f'{prefix}eval/num_correct'])}/"
              f"{int(results[f'{prefix}eval/num_examples'])}) "
              f"{prefix}eval/loss={results[f'{prefix}eval/loss']:.4f}")
      for k, v in sorted(results.items(), key=lambda kv: _natural(kv[0])):
        if k.startswith("fewshot/") and k.endswith("shot"):
          writer.print(f"step {step}: {k}={v:.4f}")
    return results

  # Loop.
  stop = StopFlag()
  stop.install()
  results = {}
  try:
    if start_step >= total_steps:
      log(f"already trained for {total_steps} steps; evaluating")
      results = evaluate(start_step, final=True)
    pending = []
    window_start, window_steps = time.time(), 0
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.to_global(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch)
      pending.append((step, step_metrics))
      window_steps += 1
      writer.advance()
      last = step == total_steps
      stopping = stop.is_set()
      save = last or stopping or _every(step, config.checkpoint_steps)
      if save or last or _every(step, config.log_steps):
        fetched = _check_finite(pending)
        pending = []
        if last or _every(step, config.log_steps):
          elapsed = time.time() - window_start
          row = dict(fetched[-1][1])
          row["perf/img_per_sec"] = window_steps * batch_size / max(
              elapsed, 1e-9)
          writer.write(step, row)
          window_start, window_steps = time.time(), 0
      if last or any(_every(step, p) for p, _, _ in evaluators):
        results = evaluate(step, final=last)
      if save:
        ckpt.save(step, state, {"step": step,
                                "data": data.get_state(train_iter)})
      if step == config.get("debug_stop_after_step"):
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if stopping and not last:
        ckpt.wait()
        name = signal.Signals(stop.signum).name if stop.signum else "signal"
        log(f"stopped by {name} at step {step}; checkpoint saved. Run the "
            "same command again to resume.")
        break
  finally:
    stop.uninstall()
    ckpt.close()
    writer.close()
  return results
