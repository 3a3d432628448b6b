"""Input pipeline: decode and augmentation cost, loader rate, beside the step.

  python -m vit_jax.bench pipeline [--config=configs/digits.py
      --datasets=config,folder --folder_images=1000 --folder_size=64
      --batches=20 --steps=10 --repeats=3 --json]

For the config's dataset (`config`) and for an image folder of real JPEG and
PNG files written to a temporary directory (`folder`: the digits, upscaled
to `--folder_size` pixels and tinted, half of them JPEG, trained with the
config's recipe), it measures:

- decode: microseconds per image to get the uint8 pixels from the source
  (PIL decoding for the folder; an array read for an in-memory source);
- augment: microseconds per image of the config's training preprocessing
  (`preprocess.train_batch`: crop, resize, flip, normalise) on a batch;
- pipeline: images/s of the real training loader (`data.train_loader` with
  the config's options, `pp.worker_count` processes: 0 for the digits), in
  its first epoch (the folder decodes every image) and after it (the folder
  reads the decoded images from memory);
- step: images/s of the config's training step on this machine (the
  task's loss, gradients and the optimizer update, jitted as in
  `vit_jax/train.py`, on batches already on the device);
- ratio: pipeline (after the first epoch) / step. The loop prepares the
  next batch while the device runs the step, so the pipeline keeps up when
  the ratio is above 1; on a CPU both share the cores.

Rates are the best of `--repeats` runs, which is robust against other load
on the machine.
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time

from absl import flags

from vit_jax import bench

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "digits.py")

FLAGS = flags.FlagValues()
flags.DEFINE_string("config", _CONFIG, "Experiment config: configs/<name>.py"
                    "[:arg] (its dataset, batch size, image size, "
                    "augmentation and model).", flag_values=FLAGS)
flags.DEFINE_list("datasets", ["config", "folder"], "What to measure: "
                  "`config` (the config's dataset), `folder` (a temporary "
                  "image folder).", flag_values=FLAGS)
flags.DEFINE_integer("folder_images", 1000, "Images of the temporary folder.",
                     lower_bound=10, flag_values=FLAGS)
flags.DEFINE_integer("folder_size", 64, "Height and width of its images.",
                     lower_bound=8, flag_values=FLAGS)
flags.DEFINE_integer("batches", 20, "Loader batches per measurement.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Training steps per measurement.",
                     lower_bound=1, flag_values=FLAGS)
bench.define_output_flags(FLAGS, "Measurements per rate; the best counts.")

DATASETS = ("config", "folder")


def from_flags(f):
  """Keyword arguments of `run` from the parsed flags `f`."""
  return dict(config=f.config, datasets=list(f.datasets),
              folder_images=f.folder_images, folder_size=f.folder_size,
              batches=f.batches, steps=f.steps, repeats=f.repeats)


def load_config(spec):
  """The ConfigDict of `path[:arg]`; ValueError for a missing file."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path} not found: pass --config=configs/"
                     "<name>.py[:arg]")
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot load the config {spec} ({e}): check the "
                     "--config path and argument") from None


def write_folder(root, num_images, size):
  """Writes the digits, upscaled to `size` and tinted, as an image folder.

  `root/train/<digit>/*.jpg|png`, alternately JPEG (quality 90) and PNG.

  Returns:
    The dataset name `folder:<root>`.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  digits = sklearn.datasets.load_digits()
  tints = np.random.default_rng(0).uniform(0.5, 1.0, (num_images, 3))
  for i in range(num_images):
    k = i % len(digits.target)
    plane = np.round(digits.images[k] * (255.0 / 16.0)).astype(np.uint8)
    plane = np.asarray(PIL.Image.fromarray(plane).resize(
        (size, size), PIL.Image.BILINEAR), np.float64)
    image = np.round(plane[..., None] * tints[i]).astype(np.uint8)
    directory = os.path.join(root, "train", str(digits.target[k]))
    os.makedirs(directory, exist_ok=True)
    ext = "jpg" if i % 2 else "png"
    PIL.Image.fromarray(image).save(os.path.join(directory, f"{i:05d}.{ext}"),
                                    quality=90)
  return f"folder:{root}"


def _best(fn, repeats):
  """Best (smallest) seconds of `repeats` calls of `fn`."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _decode_us(source, repeats, count=256):
  """Microseconds per image to get the pixels of `count` examples."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources  # pylint: disable=g-import-not-at-top
  indices = np.arange(min(count, len(source)))
  if isinstance(source, sources.FolderSource):
    files = [source.files[i] for i in indices]
    seconds = _best(lambda: [sources.decode_image(f, source.num_channels)
                             for f in files], repeats)
  else:
    seconds = _best(lambda: [source[int(i)] for i in indices], repeats)
  return 1e6 * seconds / len(indices)


def _augment_us(source, options, batch, repeats):
  """Microseconds per image of `preprocess.train_batch` on one batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  n = min(batch, len(source))
  images = [source[i]["image"] for i in range(n)]
  if len({i.shape for i in images}) == 1:
    images = np.stack(images)
  u = np.random.default_rng(0).random((n, preprocess.RANDOMS_PER_IMAGE))
  seconds = _best(lambda: preprocess.train_batch(images, u, **options),
                  repeats)
  return 1e6 * seconds / n


def _loader_rates(make_loader, batch, batches, repeats, epoch_batches):
  """(first epoch, later) images/s of the loaders `make_loader()` gives."""
  first = float("inf")
  for _ in range(repeats):
    iterator = iter(make_loader())
    start = time.perf_counter()
    for _ in range(epoch_batches):
      next(iterator)
    first = min(first, time.perf_counter() - start)
  iterator = iter(make_loader())
  for _ in range(epoch_batches):  # Past the first epoch.
    next(iterator)

  def later():
    for _ in range(batches):
      next(iterator)

  return (epoch_batches * batch / first,
          batches * batch / _best(later, repeats))


def _step_rate(config, source, image_size, num_channels, steps, repeats):
  """Images/s of the config's jitted training step (as in train.py).

  The parameters are random numbers of the model's shapes (their values do
  not change the step's cost), so that only the step is compiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import optim  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax import xla_options  # pylint: disable=g-import-not-at-top

  batch_size = int(config.batch_size)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(batch_size, mesh)
  repl, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(
      mesh)
  task = tasks.create(config, source)
  model, _, _ = train._create_model(  # pylint: disable=protected-access
      config, image_size, num_channels, task.model_fields)
  rng = jax.random.PRNGKey(0)
  dummy = jnp.zeros((1, *image_size, num_channels), jnp.float32)
  shapes = jax.eval_shape(
      lambda: model.init({"params": rng}, dummy, train=False)["params"])
  numbers = np.random.default_rng(0)
  params = jax.device_put(jax.tree.map(
      lambda s: (0.02 * numbers.standard_normal(s.shape)).astype(s.dtype),
      shapes), repl)
  tx, _ = optim.make(config.optim, shapes, 1000)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)

  def step(state, batch):
    params, opt_state = state

    def loss_of(p):
      return task.loss(model, p, batch, {"dropout": rng, "step": rng})

    (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(step, in_shardings=(repl, batch_sharding),
                 out_shardings=(repl, repl), donate_argnums=(0,),
                 compiler_options=xla_options.for_backend())
  labels = np.arange(batch_size) % max(2, int(task.model_fields.get(
      "num_classes") or 2))
  batch = sharding.to_global({
      "image": numbers.uniform(
          -1, 1, (batch_size, *image_size, num_channels)).astype(np.float32),
      "label": labels.astype(data.label_dtype(source)),
      "index": np.arange(batch_size, dtype=np.int32)}, mesh)
  state = {"s": (params, opt_state)}

  def run_steps(count):
    for _ in range(count):
      state["s"], loss = step(state["s"], batch)
    jax.block_until_ready(loss)

  run_steps(1)  # Compiles.
  return steps * batch_size / _best(lambda: run_steps(steps), repeats)


def _measure(config, dataset, batches, steps, repeats):
  """The figures of one dataset under the config's recipe."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import sizes  # pylint: disable=g-import-not-at-top
  pp = config.pp
  image_size = sizes.pair(config.image_size)
  batch = int(config.batch_size)
  source = data.get_source(dataset, config.train_split,
                           data_dir=config.get("data_dir"))
  channels = data.image_channels(source, config.get("num_channels"))
  options = dict(image_size=image_size,
                 inception_crop=pp.get("inception_crop", True),
                 crop_area=tuple(pp.get("crop_area", (0.05, 1.0))),
                 flip=pp.get("flip", True), num_channels=channels)
  workers = int(pp.get("worker_count", 0))

  def make_loader():
    fresh = data.get_source(dataset, config.train_split,
                            data_dir=config.get("data_dir"))
    return data.train_loader(fresh, batch, image_size, seed=0,
                             worker_count=workers, **{
                                 k: v for k, v in options.items()
                                 if k != "image_size"})

  epoch_batches = max(1, -(-len(source) // batch))
  first, later = _loader_rates(make_loader, batch, batches, repeats,
                               epoch_batches)
  with contextlib.redirect_stdout(sys.stderr):  # Notes on the model fields.
    step = _step_rate(config, source, image_size, channels, steps, repeats)
  return {
      "dataset": dataset.split(":")[0], "images": len(source),
      "image_shape": list(source[0]["image"].shape),
      "in_memory": getattr(source, "images", None) is not None,
      "worker_count": workers,
      "decode_us_per_image": _decode_us(source, repeats),
      "augment_us_per_image": _augment_us(source, options, batch, repeats),
      "pipeline_first_epoch_images_per_second": first,
      "pipeline_images_per_second": later,
      "step_images_per_second": step,
      "ratio": later / step,
      "backend": jax.default_backend(),
  }


def run(*, config, datasets, folder_images, folder_size, batches, steps,
        repeats):
  """Decode/augment cost, loader and step rates for each dataset.

  Returns:
    {"setup", "datasets": {name: figures}}; raises ValueError for bad
    input.
  """
  unknown = sorted(set(datasets) - set(DATASETS))
  if unknown or not datasets:
    raise ValueError(f"--datasets takes {', '.join(DATASETS)}, got "
                     f"{','.join(datasets)}")
  for name, value in (("batches", batches), ("steps", steps),
                      ("repeats", repeats)):
    if value < 1:
      raise ValueError(f"--{name} must be positive, got {value}")
  cfg = load_config(config)
  results = {}
  root = None
  try:
    for name in datasets:
      if name == "config":
        results[name] = _measure(cfg, cfg.dataset, batches, steps, repeats)
      else:
        root = tempfile.mkdtemp(prefix="vit_jax_pipeline_")
        folder_cfg = cfg.copy_and_resolve_references()
        folder_cfg.dataset = write_folder(root, folder_images, folder_size)
        folder_cfg.train_split = "train"
        results[name] = _measure(folder_cfg, folder_cfg.dataset, batches,
                                 steps, repeats)
  finally:
    if root:
      shutil.rmtree(root, ignore_errors=True)
  return {"setup": dict(config=config, batch_size=int(cfg.batch_size),
                        image_size=list(cfg.image_size),
                        folder_images=folder_images, folder_size=folder_size,
                        batches=batches, steps=steps, repeats=repeats,
                        cpu_count=os.cpu_count()),
          "datasets": results}


def report(r):
  """Prints the result of `run` as a table."""
  s = r["setup"]
  print(f"pipeline: {s['config']}, batch {s['batch_size']}, "
        f"{tuple(s['image_size'])} px, {s['cpu_count']} CPUs, best of "
        f"{s['repeats']}")
  print(f"  {'dataset':8s} {'images':>7s} {'decode':>10s} {'augment':>10s} "
        f"{'1st epoch':>12s} {'pipeline':>12s} {'step':>11s} {'ratio':>7s}")
  for name, d in r["datasets"].items():
    print(f"  {name:8s} {d['images']:7d} "
          f"{d['decode_us_per_image']:7.1f} us {d['augment_us_per_image']:7.1f}"
          f" us {d['pipeline_first_epoch_images_per_second']:8.0f} img/s "
          f"{d['pipeline_images_per_second']:8.0f} img/s "
          f"{d['step_images_per_second']:7.0f} img/s {d['ratio']:6.1f}x")
