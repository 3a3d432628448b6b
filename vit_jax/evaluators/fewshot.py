"""Few-shot linear evaluation of a frozen representation (the paper's metric).

For each dataset `(name, source, train_split, test_split)` of the config:

1. Features of a named representation (`pre_logits` by default, any key of
   the model's `out` dict, or `pixels`: the flattened preprocessed images, no
   model) are computed by the jitted model on all devices, global batches
   sharded over the mesh's "data" axis. Train and test features are computed
   once per `run` and shared by every shot count and seed. When the train
   source exposes its `labels`, only the sampled train examples are fed to
   the model.
2. For every seed, one permutation per class; the `n`-shot training set is
   the first `n` examples of each class, so shot sets are nested within a
   seed. Classes with fewer examples give what they have (reported).
3. Closed-form ridge regression (`ridge.py`): whitened features plus a bias
   column, targets in {-1, 1}^K, one eigendecomposition per (dataset, shots,
   seed) serving every L2 value; argmax on the test split. The L2 value is
   chosen by exact leave-one-out on the few-shot training set (classification
   error, ties by squared error) over `l2_regs`; the paper's fixed L2 = 2^10
   is reported beside it. On CPU the seeds are solved concurrently (see
   `PerSeed`), elsewhere in one call vmapped over seeds. A chosen L2 that is
   the smallest or largest value searched is flagged (`l2_at_grid_edge`) and
   warned of once per dataset, shot count and edge: the best value may lie
   beyond the grid.

`run(params)` returns `{"<dataset>/<n>shot": mean accuracy with the
leave-one-out L2, ..._std, ..._fixed_l2 (mean accuracy at the fixed L2),
..._fixed_l2_std, ..._l2 (median chosen L2)}`, which `format_lines` prints
as a dataset x shots table; `report(params)` the full per-seed results (what
`python -m vit_jax.fewshot` writes under "results" in its
fewshot_<representation>...json).
Standard deviations are over seeds (ddof=1; 0 for a single seed).
"""

import concurrent.futures
import functools
import math
import os

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
# jax's CPU LAPACK kernels are scipy's: importing scipy.linalg loads its BLAS
# library, so that `threadpoolctl` finds it before the first eigh is compiled.
import scipy.linalg  # pylint: disable=unused-import
import threadpoolctl

from vit_jax import data
from vit_jax import sharding
from vit_jax import sizes
from vit_jax import xla_options
from vit_jax.evaluators import common
from vit_jax.evaluators import ridge

READS = None  # A representation, not the task's output: any task.

PIXELS = "pixels"


def default_config():
  """The few-shot evaluator's fields and defaults (digits, train -> test)."""
  return ml_collections.ConfigDict(dict(
      # (name used in metrics, data.get_source name, train split, test split)
      datasets=(("digits", "digits", "train", "test"),),
      data_dir=None,
      shots=(1, 5, 10, 25),
      seeds=(0, 1, 2, 3, 4),
      l2_regs=ridge.L2_GRID,   # Searched by leave-one-out: 2^-10 .. 2^20.
      fixed_l2=ridge.FIXED_L2,  # Reported beside: 2^10 (added to the grid).
      representation="pre_logits",  # A key of the model's `out`, or "pixels".
      image_size=None,     # Needed with a model (the training loop gives its
                           # own); pixels: None keeps the source's.
      num_channels=None,   # None: the source's.
      batch_size=256,      # Global; a multiple of the "data" devices.
      eps=1e-5,            # Whitening: divide by std + eps.
      bias=1.0,            # Bias column, penalised like the features.
      progress_min_batches=20,  # Progress bar for sets with more batches.
      prefix="",           # Before "<dataset>/<n>shot" in `run`'s keys.
  ))


def sample(labels, num_classes, shots, seeds):
  """Nested few-shot training sets.

  Args:
    labels: [N] int labels of the training pool.
    num_classes: K.
    shots: shot counts.
    seeds: integer seeds.

  Returns:
    (rows, counts): rows[n] is an int array [len(seeds), N_n] of pool indices
    (class by class, the first n of each class's permutation for that seed);
    counts[c] is the number of pool examples of class c.
  """
  labels = np.asarray(labels)
  members = [np.flatnonzero(labels == c) for c in range(num_classes)]
  perms = [[np.random.default_rng([int(seed), c]).permutation(m)
            for c, m in enumerate(members)] for seed in seeds]
  rows = {n: np.stack([np.concatenate([p[:n] for p in per_class])
                       for per_class in perms]) for n in shots}
  return rows, np.array([len(m) for m in members])


def cpu_workers():
  """The cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


class PerSeed:
  """`fn(x_train, labels_train, *shared)` of one seed, applied to every seed.

  Called with x_train [S, N, D], labels_train [S, N] and the arguments that
  every seed shares (test features, labels, L2 values); returns the outputs
  of `fn` stacked over the S seeds, as numpy arrays.

  On CPU every seed is a separate call of `fn` jitted, `workers` of them at
  once (default: one per core, at most one per seed; with one worker the
  seeds run one after another), and the BLAS/LAPACK libraries are
  single-threaded while they run (process-wide, restored after), with any
  number of workers: a seed's result is then the same, bit for bit, whether
  the seeds run one after another or concurrently (LAPACK's blocked
  reductions sum in another order with another thread count, which moves
  the last bits). The symmetric eigendecomposition (LAPACK
  `syevd`, much of it a memory-bound tridiagonal reduction) gains little
  from a second thread, and in a call vmapped over seeds XLA runs the
  eigendecompositions one after another; concurrent single-threaded calls
  keep every core busy, each seed's eigendecomposition overlapping with
  another seed's (or with its matrix products, which XLA spreads over all
  cores). On other backends it is one call of `fn` vmapped over the seeds.
  """

  def __init__(self, fn, workers=None):
    options = xla_options.for_backend()
    self.one = jax.jit(fn, compiler_options=options)
    self.batched = jax.jit(
        jax.vmap(lambda x, y, shared: fn(x, y, *shared), in_axes=(0, 0, None)),
        compiler_options=options)
    self.workers = workers

  def __call__(self, x_train, labels_train, *shared):
    num_seeds = len(x_train)
    if jax.default_backend() != "cpu":
      return jax.device_get(self.batched(x_train, labels_train, shared))
    workers = min(num_seeds, self.workers or cpu_workers())
    shared = jax.device_put(shared)

    def one(s):
      return jax.device_get(self.one(x_train[s], labels_train[s], *shared))

    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
      if workers <= 1:
        outs = [one(s) for s in range(num_seeds)]
      else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
          outs = list(pool.map(one, range(num_seeds)))
    return jax.tree.map(lambda *a: np.stack(a), *outs)


@functools.lru_cache(maxsize=None)
def solver(num_classes, eps=1e-5, bias=1.0, loo=True):
  """`ridge.evaluate` for every seed (a `PerSeed`; same N for every seed)."""
  return PerSeed(functools.partial(ridge.evaluate, num_classes=num_classes,
                                   eps=eps, bias=bias, loo=loo))


def _std(x):
  return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def power_of_two(value):
  """"2^k" for an exact power of two, else the value ("0.3")."""
  value = float(value)
  if value > 0 and math.log2(value).is_integer():
    return f"2^{math.log2(value):g}"
  return f"{value:g}"


class Evaluator:
  """Few-shot linear evaluation on several datasets.

  `Evaluator(predict_fn, mesh, **fields)` with the fields of
  `default_config()` (missing ones take its defaults); `predict_fn` may be
  None for `representation="pixels"`. An image folder's test split maps its
  class names to the labels of the dataset's train split (a class the train
  split lacks is an error). `skipped` ({split: paths}, see
  `common.skipped_files`) holds the damaged files the splits left out (with
  `strict_images`, the first is an error).
  """

  def __init__(self, predict_fn, mesh, log=print, image_size=None,
               num_channels=None, data_dir=None, strict_images=False,
               **fields):
    self.predict_fn = predict_fn
    self.mesh = mesh
    self.config = c = resolve_config(dict(
        fields, image_size=image_size, num_channels=num_channels,
        data_dir=data_dir))
    self.log = log
    self.representation = c.representation
    self.shots = tuple(int(n) for n in c.shots)
    self.seeds = tuple(int(s) for s in c.seeds)
    if not self.shots or not self.seeds:
      raise ValueError(f"few-shot needs shots and seeds, got shots="
                       f"{self.shots} seeds={self.seeds}")
    l2s = sorted(set(float(v) for v in c.l2_regs) | {float(c.fixed_l2)})
    self.l2s = np.array(l2s, np.float32)
    self.fixed_index = ridge.l2_index(self.l2s, c.fixed_l2)
    self.batch_size = int(c.batch_size)
    n_data = mesh.shape["data"] if "data" in mesh.shape else 1
    multiple = math.lcm(n_data, jax.process_count())
    if self.batch_size % multiple:
      raise ValueError(
          f"fewshot batch_size={self.batch_size} is not divisible by the "
          f"{n_data} devices of the 'data' mesh axis and the "
          f"{jax.process_count()} processes: use a multiple of {multiple}")
    self.image_size = c.get("image_size")
    if self.representation != PIXELS and (predict_fn is None or
                                          self.image_size is None):
      raise ValueError(f"few-shot on representation {self.representation!r} "
                       "needs a model and its image_size")
    self.datasets = []
    self.skipped = {}
    for entry in c.datasets:
      if len(entry) != 4:
        raise ValueError(
            f"fewshot dataset {entry!r} must be (name, source, train_split, "
            "test_split), e.g. ('cifar100', 'tfds:cifar100', 'train', "
            "'test')")
      name, source, train_split, test_split = entry
      train = data.get_source(source, train_split, data_dir=c.get("data_dir"),
                              strict_images=strict_images)
      test = data.get_source(source, test_split, data_dir=c.get("data_dir"),
                             strict_images=strict_images,
                             class_names=getattr(train, "class_names", None))
      self.datasets.append((name, train, test))
      for split, src in ((train_split, train), (test_split, test)):
        self.skipped.update(common.skipped_files(src, f"{source} {split}"))
    self._features_jit = jax.jit(
        self._features, out_shardings=NamedSharding(mesh, P("data")),
        compiler_options=xla_options.for_backend())
    self._samples = {}      # dataset -> (rows, counts) of `sample`
    self._pixel_cache = {}  # pixels do not depend on params
    self._warned = set()  # (dataset, shots[, edge]) warned of

  # Features.

  def _features(self, params, images):
    """[B, ...] images -> [B, F] float32 features of the representation."""
    rep = self.representation
    if rep == PIXELS:
      x = images
    else:
      _, out = self.predict_fn(
          params, images,
          output_hidden_states=rep.startswith("block") or rep == "embeddings",
          output_attentions=rep.endswith("/attention"))
      if rep not in out:
        raise ValueError(
            f"representation {rep!r} is not an output of the model: use one "
            f"of {sorted(out)} or {PIXELS!r} (config.fewshot.representation)")
      x = out[rep]
    return x.reshape(x.shape[0], -1).astype(np.float32)

  def _image_size(self, source):
    if self.image_size is not None:
      return sizes.pair(self.image_size, "image_size")
    return tuple(np.asarray(source[0]["image"]).shape[:2])

  def features(self, params, source, desc=""):
    """Features [N, F] and labels [N] of every example, in source order."""
    if not len(source):
      raise ValueError(f"fewshot {desc or source!r}: the split is empty")
    parts = []
    for g in common.global_batches(
        source, self.mesh, self.batch_size, self._image_size(source),
        self.config.get("num_channels"), desc=desc,
        progress_min_batches=int(self.config.get("progress_min_batches",
                                                 20))):
      g["x"] = self._features_jit(params, g.pop("image"))
      host = sharding.to_numpy(g)
      keep = host["mask"]
      parts.append({k: host[k][keep] for k in ("x", "label", "index")})
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(joined["index"], kind="stable")
    return joined["x"][order], joined["label"][order]

  # Evaluation.

  def _place(self, params):
    """Host (numpy) parameters are replicated; jax arrays keep theirs."""
    if params is None:
      return None
    repl = NamedSharding(self.mesh, P())
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, repl),
        params)

  def _train_set(self, params, name, source):
    """Few-shot rows, class counts, features, pool labels of a train split.

    Returns:
      (rows, counts, x, position, labels): rows[n] [seeds, N_n] pool indices;
      x [M, F] features; `x[position[i]]` is the feature of pool example i
      (for every sampled i); labels [len(source)].
    """
    labels = getattr(source, "labels", None)
    if labels is not None and len(labels) == len(source):
      labels = np.asarray(labels)
      if name not in self._samples:
        self._samples[name] = sample(labels, source.num_classes, self.shots,
                                     self.seeds)
      rows, counts = self._samples[name]
      needed = np.unique(np.concatenate([r.ravel() for r in rows.values()]))
      x, _ = self._cached(params, ("train", name), common.Subset(source, needed),
                          f"{name} train")
      position = np.zeros(len(source), np.int64)
      position[needed] = np.arange(len(needed))
      return rows, counts, x, position, labels
    x, labels = self._cached(params, ("train", name), source, f"{name} train")
    if name not in self._samples:
      self._samples[name] = sample(labels, source.num_classes, self.shots,
                                   self.seeds)
    rows, counts = self._samples[name]
    return rows, counts, x, np.arange(len(source)), labels

  def _cached(self, params, key, source, desc):
    if self.representation != PIXELS:
      return self.features(params, source, desc)
    if key not in self._pixel_cache:
      self._pixel_cache[key] = self.features(params, source, desc)
    return self._pixel_cache[key]

  def _warn_short(self, name, n, counts):
    short = {c: int(k) for c, k in enumerate(counts) if k < n}
    if short and (name, n) not in self._warned:
      self._warned.add((name, n))
      listed = ", ".join(f"class {c}: {k}" for c, k in short.items())
      self.log(f"warning: fewshot {name}: {len(short)} classes have fewer "
               f"than {n} training examples and use all they have ({listed})")
    return short

  def _warn_edge(self, name, n, chosen):
    """Warns (once) of L2 values chosen at the smallest or largest of the
    grid; returns whether any seed's choice is there."""
    edges = {0: "smallest", len(self.l2s) - 1: "largest"}
    at_edge = False
    for index, edge in edges.items():
      seeds = [s for s, b in zip(self.seeds, chosen) if b == index]
      if not seeds:
        continue
      at_edge = True
      if (name, n, edge) in self._warned:
        continue
      self._warned.add((name, n, edge))
      value = power_of_two(self.l2s[index])
      grid = f"{power_of_two(self.l2s[0])} .. {power_of_two(self.l2s[-1])}"
      side = "below" if edge == "smallest" else "above"
      self.log(f"warning: fewshot {name} {n}-shot ({self.representation}): "
               f"leave-one-out chose L2 = {value} for seed(s) "
               f"{', '.join(map(str, seeds))}, the {edge} of the grid "
               f"{grid}; a better value may lie {side} it: widen the "
               f"few-shot config's l2_regs {side} {value} (training: "
               "--config.evals.fewshot.l2_regs=...; python -m vit_jax.fewshot:"
               " --config.l2_regs=...)")
    return at_edge

  def report(self, params):
    """Per dataset and shot count: accuracies per seed and their summary.

    Returns:
      {dataset: {"<n>": {"mean", "std", "l2" (chosen per seed), "per_seed",
      "loo_error" (per seed, at the chosen L2), "l2_at_grid_edge" (some
      seed's L2 is the smallest or largest searched), "fixed_l2",
      "fixed_l2_mean", "fixed_l2_std", "fixed_l2_per_seed", "num_train",
      "short_classes"}}}.
    """
    params = self._place(params)
    c = self.config
    results = {}
    for name, train_src, test_src in self.datasets:
      rows, counts, x_pool, position, pool_labels = self._train_set(
          params, name, train_src)
      x_test, y_test = self._cached(params, ("test", name), test_src,
                                    f"{name} test")
      fn = solver(int(train_src.num_classes), float(c.eps), float(c.bias))
      results[name] = {}
      for n in self.shots:
        r = rows[n]
        short = self._warn_short(name, n, counts)
        out = fn(x_pool[position[r]], pool_labels[r], x_test, y_test,
                 self.l2s)
        seeds = np.arange(len(self.seeds))
        chosen = out["accuracy"][seeds, out["best"]]
        fixed = out["accuracy"][:, self.fixed_index]
        results[name][str(n)] = {
            "mean": float(np.mean(chosen)), "std": _std(chosen),
            "l2": [float(self.l2s[b]) for b in out["best"]],
            "per_seed": [float(a) for a in chosen],
            "loo_error": [float(e) for e in out["loo_error"][seeds,
                                                             out["best"]]],
            "l2_at_grid_edge": self._warn_edge(name, n, out["best"]),
            "fixed_l2": float(self.l2s[self.fixed_index]),
            "fixed_l2_mean": float(np.mean(fixed)),
            "fixed_l2_std": _std(fixed),
            "fixed_l2_per_seed": [float(a) for a in fixed],
            "num_train": int(r.shape[1]),
            "short_classes": {str(k): v for k, v in short.items()},
        }
    return results

  def run(self, params, step=None):
    """Flat metrics for the training loop (see the module docstring)."""
    del step
    return metrics(self.report(params), self.config.get("prefix", ""))

  def format_lines(self, results):
    """`run`'s metrics as a caption and a dataset x shots table.

    Per dataset and shot count: the accuracy (mean ± std over seeds) with
    the L2 chosen by leave-one-out (the median over seeds), and the accuracy
    at the fixed L2. What the training loop prints (see `run_summary`).
    """
    prefix = self.config.get("prefix", "")
    several = len(self.seeds) > 1

    def accuracy(key):
      if several:
        return f"{results[key]:.4f} ± {results[key + '_std']:.4f}"
      return f"{results[key]:.4f}"

    rows = []
    for name, _, _ in self.datasets:
      for n in self.shots:
        key = f"{prefix}{name}/{n}shot"
        if key in results:
          rows.append((name, str(n), accuracy(key), power_of_two(
              results[key + "_l2"]), accuracy(key + "_fixed_l2")))
    if not rows:
      return []
    seeds = (f"{len(self.seeds)} seeds: mean ± std" if several else
             "1 seed")
    header = ("dataset", "shots", "accuracy", "L2",
              f"at L2={power_of_two(self.config.fixed_l2)}")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    lines = [f"{self.representation}, {seeds}; L2 chosen by leave-one-out"]
    shown = None
    for row in [header] + rows:
      name = "" if row[0] == shown else row[0]
      shown = row[0] if row is not header else None
      lines.append("  ".join([
          f"{name:<{widths[0]}}", f"{row[1]:>{widths[1]}}",
          f"{row[2]:<{widths[2]}}", f"{row[3]:<{widths[3]}}",
          row[4]]).rstrip())
    return lines


def metrics(report, prefix=""):
  """Flattens `Evaluator.report` into `{prefix<dataset>/<n>shot...}`."""
  out = {}
  for name, per_shots in report.items():
    for n, r in per_shots.items():
      key = f"{prefix}{name}/{n}shot"
      out[key] = r["mean"]
      out[f"{key}_std"] = r["std"]
      out[f"{key}_fixed_l2"] = r["fixed_l2_mean"]
      out[f"{key}_fixed_l2_std"] = r["fixed_l2_std"]
      out[f"{key}_l2"] = float(np.median(r["l2"]))
  return out


def resolve_config(config=None):
  """`config` over `default_config()`; `num_seeds` (int) may replace `seeds`."""
  d = default_config().to_dict()
  given = {} if config is None else (
      config.to_dict() if isinstance(config, ml_collections.ConfigDict)
      else dict(config))
  if "num_seeds" in given and "seeds" not in given:
    given["seeds"] = tuple(range(int(given.pop("num_seeds"))))
  unknown = sorted(set(given) - set(d) - {"num_seeds"})
  if unknown:
    raise ValueError(f"unknown few-shot field(s) {unknown}: the fields are "
                     f"{sorted(d)}")
  d.update({k: v for k, v in given.items() if k != "num_seeds"})
  return ml_collections.ConfigDict(d)
