"""What the evaluators share: a whole split as global batches, summed metrics.

Every example is counted exactly once: the data layer pads the last batch and
marks padding with `mask=False`; `index` is each example's position in the
split (padding repeats valid ones and is masked). Sums are computed on global
arrays under `jax.jit`, so no explicit cross-device reduction is needed.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from vit_jax import data
from vit_jax import errors
from vit_jax import sharding
from vit_jax import xla_options


def load_source(dataset, split, data_dir=None, strict_images=False,
                class_names=None):
  """`data.get_source` with a one-line error naming the dataset and split.

  `class_names` (the training split's) maps an image folder's class names to
  the labels the model was trained with (see `data.get_source`).
  """
  try:
    return data.get_source(dataset, split, data_dir=data_dir,
                           strict_images=strict_images,
                           class_names=class_names)
  except (ValueError, KeyError, FileNotFoundError, NotADirectoryError,
          ImportError) as e:
    msg = e.args[0] if e.args else str(e)
    raise errors.Error(f"cannot load dataset {dataset!r} split {split!r}: "
                       f"{msg}") from None


def skipped_files(source, what):
  """{what: sorted paths} of the damaged files `source` left out, or {}.

  `what` names the split ("folder:/data test"). Evaluators keep the union of
  theirs as `skipped`; the training loop warns of each split once (see
  `report_skipped`).
  """
  skipped = list(getattr(source, "skipped", None) or ())
  return {what: skipped} if skipped else {}


def report_skipped(train_skipped, evaluators, log=print):
  """Warns of the damaged files skipped by training and evaluation splits.

  Args:
    train_skipped: {split: paths} of the training split ("cifar10 train").
    evaluators: (name, every, evaluator) triples; an evaluator's `skipped`
      ({split: paths}), when it has one, is reported.
    log: printing function: one warning line per split, each split once.

  Returns:
    The counts to log: {"data/skipped_images": n, "<name>/skipped_images":
    files left out by that evaluator's splits}.
  """
  splits = dict(train_skipped)
  counts = {"data/skipped_images": sum(len(p) for p in splits.values())}
  for name, _, evaluator in evaluators:
    if hasattr(evaluator, "skipped"):
      counts[f"{name}/skipped_images"] = len(
          set().union(*evaluator.skipped.values()))
      for what, paths in evaluator.skipped.items():
        splits.setdefault(what, paths)
  for what, paths in splits.items():
    if paths:
      log(data.skipped_warning(paths, what))
  return counts


def global_batches(source, mesh, batch_size, image_size, num_channels=None,
                   desc="", progress_min_batches=20):
  """Yields the whole split as global batches {image, label, mask, index}."""
  if not len(source):
    raise ValueError(f"{desc or source!r}: the split is empty")
  pi, pc = jax.process_index(), jax.process_count()
  local_b = data.local_batch_size(batch_size, pc)
  start, _ = data.eval_range(len(source), pi, pc)
  total = data.num_eval_batches(len(source), batch_size, pc)
  batches = data.eval_batches(
      source, global_batch_size=batch_size, image_size=image_size,
      process_index=pi, process_count=pc, num_channels=num_channels)
  show = pi == 0 and total > progress_min_batches
  for j, batch in enumerate(tqdm.tqdm(
      batches, total=total, desc=desc, disable=not show, leave=False,
      file=sys.stderr)):
    index = (start + j * local_b + np.arange(local_b)).astype(np.int32)
    yield sharding.to_global(
        {"image": batch["image"], "label": batch["label"],
         "mask": batch["mask"], "index": index}, mesh)


class Subset:
  """The examples `indices` of a source, in that order."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.num_classes = getattr(source, "num_classes", None)
    self.class_names = getattr(source, "class_names", None)
    self.num_channels = getattr(source, "num_channels", None)
    self.label_dtype = getattr(source, "label_dtype", None)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self):
    return f"Subset({self.source!r}, {len(self)})"


class SplitSums:
  """Sums of per-example values over a split, computed under `jax.jit`.

  `per_example(params, batch) -> {name: [B] values}` is summed over the valid
  examples of every batch; `run(params)` returns the sums and `count`.
  """

  def __init__(self, per_example, mesh, source, batch_size, image_size,
               num_channels=None):
    self.mesh = mesh
    self.source = source
    self.batch_size = int(batch_size)
    self.image_size = tuple(image_size)
    self.num_channels = num_channels

    def sums(params, batch):
      mask = batch["mask"].astype(jnp.float32)
      values = per_example(params, batch)
      out = {k: jnp.sum(v.astype(jnp.float32) * mask)
             for k, v in values.items()}
      out["count"] = jnp.sum(mask)
      return out

    self._sums = jax.jit(sums, compiler_options=xla_options.for_backend())

  def run(self, params):
    totals = None
    for batch in global_batches(self.source, self.mesh, self.batch_size,
                                self.image_size, self.num_channels):
      sums = self._sums(params, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return {k: float(np.asarray(v)) for k, v in totals.items()}


class SplitEvaluator:
  """Base of evaluators that sum per-example values over one split.

  Subclasses define `per_example(self, params, batch) -> {name: [B]}` (traced
  under jit; `self.predict_fn` is the model) and `run`, which turns
  `self.sums.run(params)` (the sums and `count`) into metrics.

  `class_names` (the training split's, given by the training loop) maps an
  image folder's classes to the model's labels; `skipped` ({split: paths},
  see `skipped_files`) holds the damaged files the split left out.
  """

  def __init__(self, predict_fn, mesh, *, dataset, split, batch_size,
               image_size, num_channels=None, data_dir=None,
               strict_images=False, class_names=None):
    self.predict_fn = predict_fn
    source = load_source(dataset, split, data_dir, strict_images, class_names)
    self.skipped = skipped_files(source, f"{dataset} {split}")
    self.sums = SplitSums(self.per_example, mesh, source, batch_size,
                          image_size, num_channels)

  def per_example(self, params, batch):
    raise NotImplementedError
