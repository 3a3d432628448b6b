"""The training loop, read top to bottom.

config -> mesh -> data -> task, model & optimizer -> shardings -> update
step -> restore (or initialise) -> evaluators -> loop (log, evaluate,
checkpoint). The loop names no task and no evaluator: the task
(`vit_jax/tasks/`, `config.task`) turns a batch into a loss, and the
evaluators (`vit_jax/evaluators/`, `config.evals`) return metrics.

The whole update is one `jax.jit` with explicit shardings over the mesh;
parameters and optimizer state are donated. Per-step randomness is
`fold_in(rng, step)`, and the data iterator position is checkpointed, so a
resumed run continues exactly where the interrupted one stopped.
"""

import collections
import concurrent.futures
import contextlib
import gc
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax import checkpoint
from vit_jax import compilation_cache
from vit_jax import config_utils
from vit_jax import data
from vit_jax import errors
from vit_jax import evaluators as evaluators_lib
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import run_summary
from vit_jax import sharding
from vit_jax import sizes
from vit_jax import tasks
from vit_jax import workdir_lock
from vit_jax import xla_options
from vit_jax.analysis import curves
from vit_jax.evaluators import common

Error = errors.Error


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


class _Clock:
  """Wall time of the run's phases, and what XLA spent compiling in them.

  XLA's compilations (and loads from the persistent compilation cache) are
  counted by a `jax.monitoring` listener from the clock's start on.
  """

  _COMPILED = "/jax/core/compile/backend_compile_duration"
  _LOADED = "/jax/compilation_cache/cache_retrieval_time_sec"
  _totals = collections.Counter()
  _listening = False

  def __init__(self):
    if not _Clock._listening:
      jax.monitoring.register_event_duration_secs_listener(_Clock._count)
      _Clock._listening = True
    self.start = time.perf_counter()
    self.seconds = collections.Counter()
    self._xla_start = collections.Counter(_Clock._totals)

  @staticmethod
  def _count(event, duration, **kwargs):
    del kwargs
    if event in (_Clock._COMPILED, _Clock._LOADED):
      _Clock._totals[event] += duration
      _Clock._totals[event + "#"] += 1

  @contextlib.contextmanager
  def phase(self, name):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start

  def totals(self, rest="training"):
    """The seconds so far: `total`, `phases` ({name: seconds}, setup first,
    `rest` the time in none of them) and XLA's programs: `compiled`,
    `compile_seconds`, `loaded` (from the compilation cache),
    `load_seconds`."""
    total = time.perf_counter() - self.start
    xla = collections.Counter(_Clock._totals)
    xla.subtract(self._xla_start)
    seconds = dict(self.seconds)
    seconds[rest] = total - sum(self.seconds.values())
    order = ["setup", rest] + [k for k in seconds if k not in ("setup", rest)]
    # A program loaded from the cache also counts as compiled, for the time
    # it took to load.
    loaded, load_seconds = xla[self._LOADED + "#"], xla[self._LOADED]
    return dict(
        total=total,
        phases={name: seconds[name] for name in order if name in seconds},
        compiled=xla[self._COMPILED + "#"] - loaded,
        compile_seconds=max(0.0, xla[self._COMPILED] - load_seconds),
        loaded=loaded, load_seconds=load_seconds)


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


def _create_model(config, image_size, num_channels, task_fields):
  """The model (VisionTransformer or BiT) of the config and task; checks the
  image size."""
  if config.model_name not in models.VARIANTS:
    raise Error(f"unknown model variant {config.model_name!r}: use one of "
                f"{', '.join(models.VARIANTS)} (--config.model_name)")
  kwargs = config_utils.model_kwargs(
      config, log=print if jax.process_index() == 0 else None)
  foreign = sorted(set(task_fields) - set(models.fields(config.model_name)))
  if foreign:
    raise Error(f"--config.task={config.get('task')} needs a VisionTransformer "
                f"(it sets {', '.join(foreign)}) but {config.model_name} is a "
                "BiT ResNet: pick a ViT --config.model_name")
  kwargs.update(task_fields)
  kwargs.update(image_size=image_size, num_channels=num_channels)
  try:
    model = models.create(config.model_name, **kwargs)
    grid = model.grid_size(image_size)
  except ValueError as e:
    raise Error(str(e)) from None
  return model, grid, kwargs


def _with_shardings(shapes, shardings):
  return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)


def _fits(tree, specs):
  """Whether arrays `tree` have the structure, shapes and dtypes of `specs`."""
  if jax.tree.structure(tree) != jax.tree.structure(specs):
    return False
  return all(x.shape == s.shape and x.dtype == s.dtype
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs)))


def _put(tree, shardings):
  """Host numpy tree (same on every process) -> global sharded arrays."""
  return jax.tree.map(
      lambda x, sh: jax.make_array_from_callback(
          np.shape(x), sh, lambda idx, x=x: np.asarray(x)[idx]),
      tree, shardings)


# Whether every float of the state after the step is finite (not logged).
_FINITE = "finite_state"


def _all_finite(tree):
  """One boolean: every floating-point leaf of `tree` is finite."""
  flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _check_finite(pending):
  """Fetches per-step metrics; raises Error at the first step whose loss,
  gradient norm or new state (parameters, optimizer state, EMA) is not
  finite, before any checkpoint of that state is written."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    loss, gnorm = float(m["train/loss"]), float(m["train/grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(gnorm) and bool(m[_FINITE])):
      if not np.isfinite(loss):
        what = f"loss is {loss}"
      elif not np.isfinite(gnorm):
        what = f"gradient norm is {gnorm}"
      else:
        what = "parameters or optimizer state are not finite"
      raise Error(
          f"{what} at step {step}; the last good checkpoint is kept. Try a "
          "lower --config.optim.lr, float32 compute "
          "(--config.model.dtype=float32) or gradient clipping "
          "(--config.optim.clip_norm=1)")
  return [(s, {k: float(v) for k, v in m.items() if k != _FINITE})
          for (s, _), m in zip(pending, fetched)]


def _every(step, period):
  return bool(period) and period > 0 and step % period == 0


def train_and_evaluate(config, workdir, devices=None):
  """Trains, evaluates and checkpoints; resumes from DIR when possible.

  Args:
    config: the experiment ConfigDict (see `config_utils.default_config`).
    workdir: directory for checkpoints, metrics.jsonl, tb/ and config.json.
    devices: devices of the mesh (default: all of them).

  Returns:
    The metrics of the final evaluation (dict).
  """
  clock = _Clock()
  # Config and workdir (one process at a time: a second one is refused).
  config_utils.validate(config)
  workdir = os.path.abspath(workdir)
  _prepare_workdir(workdir)
  with workdir_lock.WorkdirLock(workdir, active=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, devices, clock)


def _train_and_evaluate(config, workdir, devices, clock):
  """`train_and_evaluate` in a prepared, locked workdir."""
  image_size = sizes.pair(config.image_size)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.get("eval_batch_size") or batch_size)

  # Mesh.
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(batch_size, mesh, "batch_size")
  sharding.check_batch_size(eval_batch_size, mesh, "eval_batch_size")

  # Data.
  strict_images = bool(config.pp.get("strict_images", False))
  train_src = common.load_source(config.dataset, config.train_split,
                                 config.get("data_dir"), strict_images)
  skipped = list(getattr(train_src, "skipped", None) or ())
  total_steps = config_utils.resolve_steps(config, len(train_src))
  train_iter = iter(_train_loader(config, train_src, image_size))
  num_channels = data.image_channels(train_src, config.get("num_channels"))

  # Task, model and optimizer.
  task = tasks.create(config, train_src)
  model, grid, model_kwargs = _create_model(
      config, image_size, num_channels, task.model_fields)
  if hasattr(task, "check"):
    task.check(model, image_size)
  evals = evaluators_lib.for_task(
      config, task, log=print if jax.process_index() == 0 else None)
  rng = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, *image_size, num_channels), jnp.float32)

  def init_params(rng):
    return model.init({"params": rng}, dummy, train=False)["params"]

  try:
    param_shapes = jax.eval_shape(init_params, rng)
  except ValueError as e:  # A layer refused the fields (e.g. GroupNorm).
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise Error(f"cannot build {config.model_name} from these fields: {first} "
                "(check the --config.model.* values)") from None
  tx, schedule = optim.make(config.optim, param_shapes, total_steps)
  ema_decay = float(config.optim.get("ema_decay") or 0.0)
  accum = int(config.optim.get("accum_steps") or 1)
  if batch_size % (accum * mesh.shape["data"]):
    raise Error(f"batch_size={batch_size} is not divisible by accum_steps="
                f"{accum} times the {mesh.shape['data']} data devices")

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

  # Update step: the task's loss of the batch (or of `accum` microbatches
  # of interleaved rows), one optimizer update. `index` is each example's
  # position in the global batch: with the step's key it makes per-example
  # randomness (masks) independent of devices, processes and accumulation.
  def train_step(state, batch):
    params, step = state["params"], state["step"]
    step_rng = jax.random.fold_in(state["rng"], step)
    batch = dict(batch, index=jnp.arange(batch_size, dtype=jnp.int32))

    def loss_of(p, b, dropout_rng):
      return task.loss(model, p, b, {"dropout": dropout_rng, "step": step_rng})

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if accum == 1:
      (loss, aux), grads = grad_fn(params, batch, step_rng)
    else:
      def micro(x):  # [B, ...] -> [accum, B / accum, ...], rows interleaved.
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

      micro_batches = jax.tree.map(micro, batch)

      def body(i, carry):
        b = jax.tree.map(lambda x: x[i], micro_batches)
        (l, a), g = grad_fn(params, b, jax.random.fold_in(step_rng, i))
        return jax.tree.map(jnp.add, carry, (l, a, g))

      zeros = jax.tree.map(jnp.zeros_like, params)
      aux_shapes = jax.eval_shape(
          lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches),
                          step_rng)[0][1])
      aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                               aux_shapes)
      loss, aux, grads = jax.lax.fori_loop(
          0, accum, body, (jnp.zeros((), jnp.float32), aux_zeros, zeros))
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = dict(state, params=new_params, opt_state=opt_state,
                     step=step + 1)
    if ema_decay:
      new_state["ema"] = optim.ema_update(state["ema"], new_params,
                                          ema_decay, step)
    metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
               "train/lr": schedule(step),
               _FINITE: _all_finite(new_state)}
    metrics.update({f"train/{k}": v for k, v in aux.items()})
    return new_state, metrics

  options = xla_options.for_backend()
  train_step = jax.jit(
      train_step, in_shardings=(state_shardings, batch_shard),
      out_shardings=(state_shardings, repl), donate_argnums=(0,),
      compiler_options=options)

  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  log(f"XLA options of the compiled steps: {xla_options.describe(options)}")
  log(f"compilation cache: {compilation_cache.current() or 'off'}")

  # The update step for these state and batch shapes, compiled ahead.
  state_spec = _with_shardings(state_shapes, state_shardings)
  batch_spec = {
      "image": jax.ShapeDtypeStruct((batch_size, *image_size, num_channels),
                                    jnp.float32, sharding=batch_shard),
      "label": jax.ShapeDtypeStruct((batch_size,), data.label_dtype(train_src),
                                    sharding=batch_shard)}

  def compile_step():
    return train_step.lower(state_spec, batch_spec).compile()

  # Restore, or initialise (from scratch or from config.init).
  ckpt = checkpoint.Manager(workdir, max_to_keep=config.max_to_keep, log=log)
  restored = ckpt.restore_latest(
      state_spec, fresh_start=bool(config.get("fresh_start")),
      check_data=lambda d: data.set_state(train_iter, d["data"]))
  if restored is not None:
    start_step, state, data_state = restored
    log(f"resumed from the checkpoint at step {start_step}")
    step_fn = compile_step() if start_step < total_steps else None
  else:
    start_step = 0
    if config.get("init"):
      random_params = sharding.to_numpy(jax.jit(init_params)(rng))
      params = checkpoint.load_init(random_params, config, grid, log=log)
      params = _put(params, param_shardings)
      state = jax.jit(make_state, out_shardings=state_shardings)(params, rng)
      step_fn = compile_step()
    else:
      # The initial state compiles in a second thread while the update step
      # compiles here: XLA compiles without the GIL, so on two cores at once.
      init_state = jax.jit(lambda rng: make_state(init_params(rng), rng),
                           out_shardings=state_shardings)
      with concurrent.futures.ThreadPoolExecutor(1) as pool:
        init_state = pool.submit(init_state.lower(rng).compile)
        step_fn = compile_step()
        state = init_state.result()(rng)

  # The resolved config, once the checkpoint (if any) is known to fit it.
  # The training split's class names travel with the run: every evaluation
  # (here, few-shot, analyze) maps class names to these labels.
  class_names = getattr(train_src, "class_names", None)
  class_names = None if class_names is None else [str(n) for n in class_names]
  if jax.process_index() == 0:
    config_utils.save_config(config, workdir, extra={"resolved": dict(
        total_steps=total_steps, num_classes=model.num_classes,
        image_size=list(image_size), num_channels=num_channels,
        model_kwargs=model_kwargs, class_names=class_names)})

  # Evaluators, from config.evals fitted to the task.
  def predict_fn(params, images, **kwargs):
    return model.apply({"params": params}, images, train=False, **kwargs)

  context = dict(
      dataset=config.dataset, split=config.eval_split,
      train_split=config.train_split, data_dir=config.get("data_dir"),
      batch_size=eval_batch_size, image_size=image_size,
      num_channels=num_channels, seed=int(config.seed), workdir=workdir,
      log=log, strict_images=strict_images, class_names=class_names)
  evaluators = []
  for name, cfg in evals.items():
    if int(cfg.get("every", 0) or 0) < 0:
      continue
    every, evaluator = evaluators_lib.create(name, cfg, predict_fn, mesh,
                                             context)
    evaluators.append((name, every, evaluator))

  # Rows past the restored step were written after its checkpoint by the
  # interrupted run: they are dropped, and written again as training goes.
  writer = metrics_lib.MetricWriter(workdir, total_steps, start_step,
                                    progress=config.get("progress", True))
  # Damaged image files skipped by training and the evaluators: warned of at
  # every start, counted in the row of step 0.
  skipped_row = common.report_skipped(
      {f"{config.dataset} {config.train_split}": skipped}, evaluators, log)
  if not start_step:
    writer.write(0, skipped_row)

  latest = {}  # The latest metrics of each evaluator, for the summary.

  def evaluate(step, final=False):
    results = {}
    for name, every, evaluator in evaluators:
      if not (final or _every(step, every)):
        continue
      trees = [("", state["params"])]
      if ema_decay:
        trees.append(("ema/", state["ema"]))
      for prefix, params in trees:
        out = evaluator.run(params, step=step)
        for line in run_summary.step_lines(step, prefix + name, evaluator,
                                           out):
          writer.print(line)
        latest[prefix + name] = (evaluator, out)
        results.update({f"{prefix}{name}/{k}": v for k, v in out.items()})
    writer.write(step, results)
    if jax.process_index() == 0:  # DIR/curves.png; a failure is a warning.
      curves.write_safely(workdir, log=writer.print)
    return results

  # Loop.
  stop = StopFlag()
  stop.install()
  results, completed, stopped_by = {}, False, None
  try:
    clock.seconds["setup"] = time.perf_counter() - clock.start
    if start_step >= total_steps:
      log(f"already trained for {total_steps} steps; evaluating")
      with clock.phase("evaluation"):
        results = evaluate(start_step, final=True)
    pending = []
    window_start, window_steps = time.time(), 0
    for step in range(start_step + 1, total_steps + 1):
      batch = sharding.to_global(next(train_iter), mesh)
      if step == start_step + 1 and not _fits(batch, batch_spec):
        step_fn = train_step  # Compiles for this batch at its first call.
      state, step_metrics = step_fn(state, batch)
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
      if last or any(_every(step, every) for _, every, _ in evaluators):
        with clock.phase("evaluation"):
          results = evaluate(step, final=last)
      if save:
        with clock.phase("checkpoints"):
          ckpt.save(step, state, {"step": step,
                                  "data": data.get_state(train_iter)})
      if stopping and not last:
        ckpt.wait()
        stopped_by = (signal.Signals(stop.signum).name if stop.signum
                      else "signal", step)
        break
    completed = True
  finally:
    stop.uninstall()
    try:
      with clock.phase("checkpoints"):
        ckpt.close()
    except Error:
      if completed:  # Else the error that ended the loop is the one shown.
        raise
    finally:
      writer.close()
    # Stop grain's worker processes and drop the last batch (its host
    # buffers may be the workers' shared memory) now: collected only at
    # interpreter exit, they trigger the resource tracker's leak warning.
    train_iter = batch = None
    gc.collect()
  if jax.process_index() == 0:
    if stopped_by:
      summary = run_summary.stopped(workdir, *stopped_by, total_steps,
                                    clock.totals())
    else:
      summary = run_summary.final(workdir, max(start_step, total_steps),
                                  total_steps, latest, clock.totals(), model,
                                  start_step)
    print("\n".join(summary), flush=True)
  return results
