"""Host-local batches: the grain training loader and padded evaluation batches.

Each process reads only its own share and produces batches of
`global_batch_size // process_count` examples as numpy arrays; the training
loop turns them into global arrays.

Training reads one global stream: the sampler orders the whole training set
(reshuffled every epoch) and process p of P reads positions p, p + P, p + 2P,
.... With `worker_count=0` the examples of global step k are positions
[k * B, (k + 1) * B) whatever the number of processes, so runs on different
process counts see the same global batches.

Training randomness (shuffling, crops, flips) depends only on the seed and
the global position in the sample stream: grain's `IndexSampler` gives record
`i` the generator `Philox(key=s + i)`, where `s` is a 31-bit hash of the seed
(so that nearby seeds do not share shifted streams). A restored iterator
therefore continues with exactly the batches the interrupted one would have
produced. Batch composition also depends on `worker_count` (grain batches
within each worker), so resume with the same worker count.

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

from absl import flags
import grain
import numpy as np

from vit_jax import sizes

from vit_jax.data import preprocess
from vit_jax.data import sources


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


def _sampler_seed(seed):
  """A well-mixed 31-bit sampler seed derived from a user seed."""
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}")
  return int(np.random.SeedSequence(int(seed)).generate_state(1)[0] >> 1)


class _TrainTransform(grain.transforms.RandomMap):
  """Random training preprocessing of one example."""

  def __init__(self, label_dtype=np.int32, **options):
    self.label_type = np.dtype(label_dtype).type
    self.options = options

  def random_map(self, element, rng):
    image = preprocess.train_image(element["image"], rng, **self.options)
    return {"image": image, "label": self.label_type(element["label"])}


class _EvalTransform(grain.transforms.Map):
  """Deterministic evaluation preprocessing of one example."""

  def __init__(self, label_dtype=np.int32, **options):
    self.label_type = np.dtype(label_dtype).type
    self.options = options

  def map(self, element):
    image = preprocess.eval_image(element["image"], **self.options)
    return {"image": image, "label": self.label_type(element["label"])}


def train_loader(source, global_batch_size, image_size, seed=0,
                 process_index=0, process_count=1, inception_crop=True,
                 crop_area=preprocess.DEFAULT_CROP_AREA,
                 aspect_ratio=preprocess.DEFAULT_ASPECT_RATIO, flip=True,
                 num_channels=None, worker_count=0, worker_buffer_size=1,
                 shuffle=True, num_epochs=None):
  """Returns a grain `DataLoader` of this process's training batches.

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
    worker_count: grain worker processes (0 = in this process). The batch
      sequence depends on it; a saved state only restores with the same
      value.
    worker_buffer_size: batches each worker prepares ahead.
    shuffle: shuffle the examples (each epoch differently).
    num_epochs: None repeats forever.

  Returns:
    A `grain.DataLoader`; `iter()` of it yields {"image": float32
    [local_B, h, w, C] in [-1, 1], "label": int32 [local_B]} (float32
    labels for a source with float labels, see the module doc).
  """
  batch = local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process index {process_index} is not in [0, {process_count})")
  if not len(source):
    raise ValueError("the training source has no examples")
  if worker_count and not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside of an absl app (e.g.
    # in a notebook) their defaults are used.
    flags.FLAGS.mark_as_parsed()
  shard_options = grain.sharding.ShardOptions(
      shard_index=process_index, shard_count=process_count,
      drop_remainder=True)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shard_options=grain.sharding.NoSharding(),
      shuffle=shuffle, num_epochs=num_epochs, seed=_sampler_seed(seed))
  transform = _TrainTransform(
      label_dtype=sources.label_dtype(source),
      image_size=sizes.pair(image_size, "image_size"),
      inception_crop=inception_crop, crop_area=tuple(crop_area),
      aspect_ratio=tuple(aspect_ratio), flip=flip,
      num_channels=image_channels(source, num_channels))
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[transform,
                  grain.transforms.Batch(batch_size=batch,
                                         drop_remainder=True)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      shard_options=shard_options)


def get_state(iterator):
  """JSON string of a training iterator's position (for checkpoints)."""
  state = iterator.get_state()
  return state.decode() if isinstance(state, bytes) else state


def set_state(iterator, state):
  """Moves a training iterator to a position saved by `get_state`."""
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
                 num_threads=8):
  """Yields this process's evaluation batches; each example exactly once.

  Process p evaluates the p-th contiguous block of ceil(N / process_count)
  examples. Batches have the local size `global_batch_size // process_count`;
  `mask` is False on padding. Every process yields the same number of
  batches (`num_eval_batches`), padding with fully masked batches if its
  block is short, so collective operations stay in step across processes.
  Images have `image_channels(source, num_channels)` channels, as in
  `train_loader`.

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
  transform = _EvalTransform(label_dtype=label_dtype, image_size=size,
                             num_channels=channels,
                             crop_fraction=crop_fraction)
  examples = iter(())
  if stop > start:
    dataset = grain.MapDataset.source(source)[start:stop].map(transform)
    examples = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads,
                          prefetch_buffer_size=2 * batch)))
  for _ in range(total):
    chunk = [e for _, e in zip(range(batch), examples)]
    images = np.zeros((batch, *size, channels), np.float32)
    labels = np.zeros((batch,), label_dtype)
    mask = np.zeros((batch,), bool)
    for i, example in enumerate(chunk):
      images[i] = example["image"]
      labels[i] = example["label"]
      mask[i] = True
    yield {"image": images, "label": labels, "mask": mask}
