"""Host-local batches: the training loader and padded evaluation batches.

Each process reads only its own share and produces batches of
`global_batch_size // process_count` examples as numpy arrays; the training
loop turns them into global arrays.

Training reads one global stream: every epoch is a permutation of the whole
training set (reshuffled every epoch), the stream is the epochs one after the
other, global batch k is positions [k * B, (k + 1) * B) of it, and process p
of P reads positions p, p + P, p + 2P, ... of each global batch. Runs on
different process counts therefore see the same global batches.

Batches are assembled in the training process (`worker_count=0`, the
default) a whole batch at a time: an in-memory source (`ArraySource`, such as
the bundled digits) is read by array indexing, other sources (image folders,
tfds) in `read_threads` threads, one batch ahead of the training step; the
batch is then cropped, resized, flipped and normalised at once
(`preprocess.train_batch`). Image folders keep decoded images in memory (see
`vit_jax.data.sources.FolderSource`), so from the second epoch on they cost
no decoding. `worker_count > 0` runs grain worker processes instead, each
preparing whole batches example by example; use them only when decoding does
not keep up.

Training randomness (shuffling, crops, flips) depends only on the seed and
the position in the stream: the permutation of epoch e comes from
`(seed, e)`, and the crops and flips of global batch k from `(seed, k)` (one
row of `preprocess.RANDOMS_PER_IMAGE` uniform numbers per example, the same
rows whatever the process count). A restored iterator therefore continues
with exactly the batches the interrupted one would have produced. With
`worker_count > 0` grain's sampler orders the stream instead (record i of
the stream gets the generator `Philox(key=s + i)`, `s` a 31-bit hash of the
seed) and batches are formed within each worker, so the batches depend on
the worker count: resume with the same value.

Both loaders give every image the same channel count, `image_channels(source,
num_channels)`: the `num_channels` asked for, else the source's
`num_channels`, else its first image's; each image is converted with
`preprocess.to_channels`, the conversion image files are decoded with.
Training and evaluation batches of a source therefore agree.

Labels keep their kind: class labels are int32, float labels (regression
targets) float32. The dtype comes from the source's `label_dtype` attribute,
or, for a source without one, from its first example's label (see
`vit_jax.data.sources.label_dtype`).
"""

import concurrent.futures
import json

from absl import flags
import grain
import numpy as np

from vit_jax import errors
from vit_jax import sizes

from vit_jax.data import preprocess
from vit_jax.data import sources

# Threads that read (decode) examples of sources that are not in memory.
READ_THREADS = 4
_STATE_VERSION = 1
# Seeds of the stream's permutations and of the augmentation's numbers.
_SHUFFLE, _AUGMENT = 0, 1


def local_batch_size(global_batch_size, process_count):
  """Per-process batch size; the global size must split evenly."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"number of processes {process_count}")
  return global_batch_size // process_count


def image_channels(source, num_channels=None):
  """The channel count of a source's batches.

  `num_channels` when given, else the source's `num_channels` attribute,
  else the channel count of its first image (None for an empty source).
  `train_loader` and `eval_batches` convert every image to it.
  """
  if num_channels:
    return int(num_channels)
  channels = getattr(source, "num_channels", None)
  if channels:
    return int(channels)
  if not len(source):
    return None
  image = np.asarray(source[0]["image"])
  return int(image.shape[-1]) if image.ndim == 3 else 1


def _check_seed(seed):
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  return int(seed)


def _sampler_seed(seed):
  """A well-mixed 31-bit grain sampler seed derived from a user seed."""
  return int(np.random.SeedSequence(_check_seed(seed)).generate_state(1)[0]
             >> 1)


def _in_memory_arrays(source):
  """(images [N, H, W, C], labels [N]) of an in-memory source, else None."""
  images = getattr(source, "images", None)
  labels = getattr(source, "labels", None)
  if (isinstance(images, np.ndarray) and images.ndim == 4 and
      isinstance(labels, np.ndarray) and len(images) == len(labels)):
    return images, labels
  return None


class _Reader:
  """Reads examples of a source: by array indexing when it is in memory,
  else in threads, optionally one request ahead."""

  def __init__(self, source, threads):
    self.source = source
    self.label_dtype = sources.label_dtype(source)
    self.arrays = _in_memory_arrays(source)
    self.pool = None
    if self.arrays is None and threads > 0:
      self.pool = concurrent.futures.ThreadPoolExecutor(
          threads, thread_name_prefix="vit_jax-read")
      self.threads = threads

  def _examples(self, indices):
    return [self.source[int(i)] for i in indices]

  def submit(self, indices):
    """Starts reading examples `indices`; `result` of the return value."""
    indices = np.asarray(indices, np.int64)
    if self.pool is None:
      return indices
    chunks = np.array_split(indices, min(self.threads, max(1, len(indices))))
    return [self.pool.submit(self._examples, c) for c in chunks if len(c)]

  def result(self, request):
    """(images: array [n, H, W, C] or list of n arrays, labels [n])."""
    if self.arrays is not None:
      images, labels = self.arrays
      return images[request], labels[request].astype(self.label_dtype)
    if self.pool is None:
      examples = self._examples(request)
    else:
      examples = [e for f in request for e in f.result()]
    images = [np.asarray(e["image"]) for e in examples]
    images = [i[..., None] if i.ndim == 2 else i for i in images]
    labels = np.array([e["label"] for e in examples], self.label_dtype)
    return images, labels

  def close(self):
    if self.pool is not None:
      self.pool.shutdown(wait=False, cancel_futures=True)
      self.pool = None


class _Loader:
  """The in-process training loader; `iter()` gives a `_BatchIterator`."""

  def __init__(self, source, global_batch_size, process_index, process_count,
               seed, shuffle, num_epochs, read_threads, options):
    self.source = source
    self.global_batch_size = global_batch_size
    self.batch = local_batch_size(global_batch_size, process_count)
    self.process_index = process_index
    self.process_count = process_count
    self.seed = _check_seed(seed)
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.read_threads = read_threads
    self.options = options

  def __iter__(self):
    return _BatchIterator(self)


class _BatchIterator:
  """This process's training batches; `get_state`/`set_state` (JSON)."""

  def __init__(self, loader):
    self._loader = loader
    self._num_records = len(loader.source)
    self._reader = _Reader(loader.source, loader.read_threads)
    self._permutations = {}
    self._step = 0
    self._ahead = None  # (step, request) read one batch ahead.
    total = None if loader.num_epochs is None else (
        loader.num_epochs * self._num_records)
    self._num_steps = None if total is None else (
        total // loader.global_batch_size)
    # This process's rows of a global batch.
    self._rows = loader.process_index + loader.process_count * np.arange(
        loader.batch)

  def __iter__(self):
    return self

  def _records(self, step):
    """Source indices of this process's examples of global batch `step`."""
    positions = step * self._loader.global_batch_size + self._rows
    epochs, within = np.divmod(positions, self._num_records)
    if not self._loader.shuffle:
      return within
    records = np.empty_like(within)
    for epoch in np.unique(epochs):
      if epoch not in self._permutations:
        if len(self._permutations) > 1:
          self._permutations.pop(min(self._permutations))
        self._permutations[epoch] = np.random.default_rng(
            [self._loader.seed, _SHUFFLE, int(epoch)]).permutation(
                self._num_records)
      here = epochs == epoch
      records[here] = self._permutations[epoch][within[here]]
    return records

  def _request(self, step):
    if self._num_steps is not None and step >= self._num_steps:
      return None
    return self._reader.submit(self._records(step))

  def __next__(self):
    step = self._step
    if self._num_steps is not None and step >= self._num_steps:
      raise StopIteration
    if self._ahead is not None and self._ahead[0] == step:
      request = self._ahead[1]
    else:
      request = self._request(step)
    if self._reader.pool is not None:
      self._ahead = (step + 1, self._request(step + 1))
    images, labels = self._reader.result(request)
    u = np.random.default_rng([self._loader.seed, _AUGMENT, step]).random(
        (self._loader.global_batch_size, preprocess.RANDOMS_PER_IMAGE))
    batch = {"image": preprocess.train_batch(images, u[self._rows],
                                             **self._loader.options),
             "label": labels}
    self._step = step + 1
    return batch

  def _identity(self):
    loader = self._loader
    return {"global_batch_size": loader.global_batch_size,
            "num_records": self._num_records, "seed": loader.seed,
            "shuffle": bool(loader.shuffle),
            "source": repr(loader.source)}

  def get_state(self):
    """JSON: the next global batch and what the stream depends on."""
    return json.dumps(dict(version=_STATE_VERSION, next_batch=self._step,
                           **self._identity()), indent=2)

  def set_state(self, state):
    """Continues at a position saved by `get_state`.

    A state saved by grain's loader with `worker_count=0` continues at the
    same position of the stream (in this loader's order).
    """
    state = json.loads(state)
    if "last_seen_indices" in state:
      self._step = self._from_grain(state)
    else:
      for key, value in self._identity().items():
        if state.get(key) != value:
          raise errors.Error(
              f"the data iterator state was saved with {key}={state.get(key)!r}"
              f" but this loader has {key}={value!r}: resume with the "
              "config the state was saved with")
      self._step = int(state["next_batch"])
    self._ahead = None

  def _from_grain(self, state):
    workers = int(state.get("worker_count", 0))
    if workers:
      raise ValueError(
          f"the data iterator state was saved with {workers} grain worker "
          f"processes: resume with --config.pp.worker_count={workers}")
    loader = self._loader
    last = int(state["last_seen_indices"].get("0", -1))
    consumed = (last - loader.process_index) // loader.process_count + 1
    return max(0, consumed) // loader.batch

  def close(self):
    """Stops the reading threads (they also stop when the iterator is
    garbage collected)."""
    self._reader.close()


class _TrainTransform(grain.transforms.RandomMap):
  """Random training preprocessing of one example (grain workers)."""

  def __init__(self, label_dtype=np.int32, **options):
    self.label_type = np.dtype(label_dtype).type
    self.options = options

  def random_map(self, element, rng):
    image = preprocess.train_image(element["image"], rng, **self.options)
    return {"image": image, "label": self.label_type(element["label"])}


def _grain_loader(source, seed, batch, process_index, process_count, shuffle,
                  num_epochs, worker_count, worker_buffer_size, options):
  """The grain `DataLoader` of `worker_count` worker processes."""
  if not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside of an absl app (e.g.
    # in a notebook) their defaults are used.
    flags.FLAGS.mark_as_parsed()
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count,
      drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=grain.sharding.NoSharding(),
      shuffle=shuffle, num_epochs=num_epochs, seed=_sampler_seed(seed))
  transform = _TrainTransform(label_dtype=sources.label_dtype(source),
                              **options)
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[transform,
                  grain.transforms.Batch(batch_size=batch,
                                         drop_remainder=True)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard_options,
      # Few reading threads and a short buffer: grain polls every buffered
      # read at every example.
      read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))


def train_loader(source, global_batch_size, image_size, seed=0,
                 process_index=0, process_count=1, inception_crop=True,
                 crop_area=preprocess.DEFAULT_CROP_AREA,
                 aspect_ratio=preprocess.DEFAULT_ASPECT_RATIO, flip=True,
                 num_channels=None, worker_count=0, worker_buffer_size=1,
                 shuffle=True, num_epochs=None, read_threads=READ_THREADS):
  """Returns the loader of this process's training batches.

  This process reads every `process_count`-th position of one global stream
  over the whole source (see the module doc); each epoch is reshuffled, and
  epochs repeat forever unless `num_epochs` is given. Batches cross epoch
  boundaries.

  Args:
    source: a random-access source of {"image": uint8 [H, W, C], "label"}.
    global_batch_size: batch size summed over all processes.
    image_size: int or (height, width) of the output images.
    seed: seed of shuffling and augmentation (0 <= seed < 2**32).
    process_index: index of this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    inception_crop: random resized crop; otherwise a central crop.
    crop_area: (min, max) fraction of the image area of the random crop.
    aspect_ratio: (min, max) width / height of the random crop.
    flip: random horizontal flips.
    num_channels: convert images to 1 or 3 channels; None: the source's
      (`image_channels`).
    worker_count: grain worker processes (0: batches are made in this
      process). The batch sequence depends on it; a saved state only
      restores with the same value.
    worker_buffer_size: batches each worker prepares ahead.
    shuffle: shuffle the examples (each epoch differently).
    num_epochs: None repeats forever.
    read_threads: with `worker_count=0`, threads reading a source that is
      not in memory (image files, tfds records); 0 reads in the calling
      thread.

  Returns:
    An iterable; `iter()` of it yields {"image": float32 [local_B, h, w, C]
    in [-1, 1], "label": int32 [local_B]} (float32 labels for a source with
    float labels, see the module doc), and `get_state` / `set_state` of
    the iterator save and restore its position.
  """
  batch = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process index {process_index} is not in [0, {process_count})")
  if not len(source):
    raise ValueError("the training source has no examples")
  options = dict(
      image_size=sizes.pair(image_size, "image_size"),
      inception_crop=inception_crop, crop_area=tuple(crop_area),
      aspect_ratio=tuple(aspect_ratio), flip=flip,
      num_channels=image_channels(source, num_channels))
  if worker_count:
    return _grain_loader(source, seed, batch, process_index, process_count,
                         shuffle, num_epochs, worker_count,
                         worker_buffer_size, options)
  return _Loader(source, global_batch_size, process_index, process_count,
                 seed, shuffle, num_epochs, read_threads, options)


def get_state(iterator):
  """JSON string of a training iterator's position (for checkpoints)."""
  state = iterator.get_state()
  return state.decode() if isinstance(state, bytes) else state


def set_state(iterator, state):
  """Moves a training iterator to a position saved by `get_state`."""
  if isinstance(iterator, _BatchIterator):
    iterator.set_state(state.decode() if isinstance(state, bytes) else state)
  else:
    iterator.set_state(state.encode() if isinstance(state, str) else state)


def num_examples(source):
  """Number of examples of a source."""
  return len(source)


def num_eval_batches(num_records, global_batch_size, process_count=1):
  """Batches every process yields in `eval_batches` for `num_records`."""
  batch = local_batch_size(global_batch_size, process_count)
  per_process = -(-num_records // process_count)
  return -(-per_process // batch)


def eval_range(num_records, process_index, process_count):
  """The contiguous [start, stop) of examples a process evaluates."""
  per_process = -(-num_records // process_count)
  start = min(num_records, process_index * per_process)
  return start, min(num_records, start + per_process)


def eval_batches(source, global_batch_size, image_size, process_index=0,
                 process_count=1, num_channels=None, crop_fraction=1.0,
                 num_threads=READ_THREADS):
  """Yields this process's evaluation batches; each example exactly once.

  Process p evaluates the p-th contiguous block of ceil(N / process_count)
  examples. Batches have the local size `global_batch_size // process_count`;
  `mask` is False on padding. Every process yields the same number of
  batches (`num_eval_batches`), padding with fully masked batches if its
  block is short, so collective operations stay in step across processes.
  Images have `image_channels(source, num_channels)` channels, as in
  `train_loader`. A source that is not in memory is read in `num_threads`
  threads, one batch ahead.

  Yields:
    {"image": float32 [local_B, h, w, C], "label": int32 [local_B],
     "mask": bool [local_B]}; labels are float32 for a source with float
    labels (see the module doc), and 0 on padding.
  """
  batch = local_batch_size(global_batch_size, process_count)
  size = sizes.pair(image_size, "image_size")
  start, stop = eval_range(len(source), process_index, process_count)
  total = num_eval_batches(len(source), global_batch_size, process_count)
  label_dtype = sources.label_dtype(source)
  channels = image_channels(source, num_channels) if total else None
  reader = _Reader(source, num_threads if stop > start else 0)

  def request(j):
    lo = min(stop, start + j * batch)
    return reader.submit(np.arange(lo, min(stop, lo + batch)))

  try:
    pending = request(0)
    for j in range(total):
      current, pending = pending, request(j + 1)
      images = np.zeros((batch, *size, channels), np.float32)
      labels = np.zeros((batch,), label_dtype)
      mask = np.zeros((batch,), bool)
      examples, example_labels = reader.result(current)
      n = len(example_labels)
      if n:
        images[:n] = preprocess.eval_batch(examples, size, channels,
                                           crop_fraction)
        labels[:n] = example_labels
        mask[:n] = True
      yield {"image": images, "label": labels, "mask": mask}
  finally:
    reader.close()
