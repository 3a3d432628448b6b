"""Input pipeline: sources, host-side preprocessing, host-local batches.

    src = data.get_source("digits", "train")        # or "cifar10", "folder:/root"
    it = iter(data.train_loader(src, global_batch_size=32, image_size=(32, 32)))
    batch = next(it)                                 # numpy, this process's share
    state = data.get_state(it)                       # JSON string
    for batch in data.eval_batches(src_test, 32, (32, 32)):
      ...                                            # batch["mask"] marks padding

Every image file is decoded by `data.decode_image`, whose channel
conversion (`preprocess.to_channels`) the loaders also apply, to
`data.image_channels(src, num_channels)` channels: training, evaluation and
few-shot batches of a source agree. An image folder checks its files when it
is built and skips damaged ones (`src.skipped`, sorted paths), or with
`get_source(..., strict_images=True)` raises `vit_jax.errors.Error` naming
the first.

Labels are int32 class indices, or float32 targets for sources with float
labels such as "digits_value" or a folder with a labels.csv
(`data.label_dtype(src)`; see `vit_jax.data.sources`).

Batches are made in the training process, a whole batch at a time
(`data.train_batch`, `data.eval_batch`: vectorised crops, resizing, flips):
an in-memory source is read by array indexing, files in threads, and an
image folder keeps its decoded images in memory after the first epoch
(see `vit_jax.data.loader`).
"""

from vit_jax.data.loader import eval_batches
from vit_jax.data.loader import eval_range
from vit_jax.data.loader import get_state
from vit_jax.data.loader import image_channels
from vit_jax.data.loader import local_batch_size
from vit_jax.data.loader import num_eval_batches
from vit_jax.data.loader import num_examples
from vit_jax.data.loader import set_state
from vit_jax.data.loader import train_loader
from vit_jax.data.preprocess import eval_batch
from vit_jax.data.preprocess import eval_image
from vit_jax.data.preprocess import train_batch
from vit_jax.data.preprocess import train_image
from vit_jax.data.sources import ArraySource
from vit_jax.data.sources import DatasetNotPreparedError
from vit_jax.data.sources import FolderSource
from vit_jax.data.sources import TfdsSource
from vit_jax.data.sources import check_image
from vit_jax.data.sources import check_images
from vit_jax.data.sources import decode_image
from vit_jax.data.sources import digits_canvas_source
from vit_jax.data.sources import digits_source
from vit_jax.data.sources import digits_value_source
from vit_jax.data.sources import get_source
from vit_jax.data.sources import label_dtype
from vit_jax.data.sources import skipped_warning
