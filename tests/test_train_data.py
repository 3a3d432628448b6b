"""Training through `main` on a real tfds dataset and on an image folder,
and with grain's worker processes."""

import json
import os
import sys

import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import data
from vit_jax import main
from vit_jax import metrics
from vit_jax.data import loader
from vit_jax.data import preprocess

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import folder_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position
import tfds_fixture  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config=configs/vit.py:testing,cifar10,runlocal",
    "--config.total_steps=3", "--config.log_steps=1", "--config.evals.eval.every=0",
    "--config.checkpoint_steps=0", "--config.progress=False",
    "--config.batch_size=16", "--config.eval_batch_size=16",
    "--config.image_size=(16, 16)", "--config.model.hidden_size=16",
    "--config.model.mlp_dim=32", "--config.model.num_heads=2",
    "--config.model.patch_size=8", "--config.train_split=train",
    "--config.eval_split=test",
]


def _run(capfd, workdir, *args):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    rc = main.run(["vit_jax.main", *TINY, *args, f"--workdir={workdir}"])
  finally:
    os.chdir(cwd)
  out, err = capfd.readouterr()
  return rc, out + err


def _check(workdir, num_classes, num_eval):
  rows = metrics.read_jsonl(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  evals = [r for r in rows if "eval/accuracy" in r]
  assert len(evals) == 1 and evals[0]["eval/num_examples"] == num_eval
  params, config = checkpoint.latest_params(workdir)
  assert params["head"]["kernel"].shape == (16, num_classes)
  assert config.resolved.num_classes == num_classes


def test_tfds_dataset_end_to_end(capfd, tmp_path):
  data_dir = str(tmp_path / "tfds")
  name = tfds_fixture.build_tiny_tfds(data_dir, image_size=(20, 20),
                                      splits={"train": 64, "test": 24})
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, workdir, f"--config.dataset=tfds:{name}",
                 f"--config.data_dir={data_dir}")
  assert rc == 0, out
  assert "eval/accuracy=" in out and "(24 examples)" not in out
  _check(workdir, 10, 24)


def test_image_folder_end_to_end(capfd, tmp_path):
  root = folder_fixture.make_image_folder(
      str(tmp_path / "images"), classes=("a", "b", "c"),
      splits={"train": 8, "test": 3}, image_size=(12, 20))
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, workdir, f"--config.dataset=folder:{root}")
  assert rc == 0, out
  assert "eval/num_examples=9" in out
  _check(workdir, 3, 9)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_worker_process_batches_and_state():
  """`worker_count=1`: the batches a grain worker process makes equal those
  grain makes in this process from the same sampler and transform (bitwise:
  each record is augmented by the same numpy code from its own seed), across
  an epoch boundary; a state saved there resumes in a new worker."""
  source = data.get_source("digits", "train[:40]")
  kwargs = dict(seed=1, inception_crop=True, flip=True)
  workers = iter(data.train_loader(source, 8, (8, 8), worker_count=1,
                                   **kwargs))
  got = _take(workers, 4)
  state = data.get_state(workers)
  assert json.loads(state)["worker_count"] == 1
  got += _take(workers, 3)  # Batch 5 starts the second epoch.
  options = dict(image_size=(8, 8), inception_crop=True,
                 crop_area=preprocess.DEFAULT_CROP_AREA,
                 aspect_ratio=preprocess.DEFAULT_ASPECT_RATIO, flip=True,
                 num_channels=1)
  here = iter(loader._grain_loader(  # pylint: disable=protected-access
      source, 1, 8, 0, 1, shuffle=True, num_epochs=None, worker_count=0,
      worker_buffer_size=1, options=options))
  want = _take(here, 7)
  for a, b in zip(got, want):
    assert a["image"].shape == (8, 8, 8, 1) and a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Each epoch holds every image once: 40 labels, the split's counts.
  first_epoch = np.concatenate([b["label"] for b in got[:5]])
  np.testing.assert_array_equal(np.bincount(first_epoch, minlength=10),
                                np.bincount(source.labels, minlength=10))
  resumed = iter(data.train_loader(source, 8, (8, 8), worker_count=1,
                                   **kwargs))
  data.set_state(resumed, state)
  for a, b in zip(_take(resumed, 3), got[4:]):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_worker_process_loader_trains_through_main(capfd, tmp_path):
  """--config.pp.worker_count=1: the training batches come from a grain
  worker process (checked above), through training, evaluation and the
  final checkpoint."""
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, workdir, "--config.dataset=digits",
                 "--config.pp.worker_count=1")
  assert rc == 0, out
  assert "Traceback" not in out
  _check(workdir, 10, 360)


def test_damaged_images_are_skipped_and_counted(capfd, tmp_path):
  # 60 training images, 2 of them damaged (a truncated file, a text x.jpg).
  root = folder_fixture.make_image_folder(
      str(tmp_path / "images"), classes=("cat", "dog", "fish"),
      splits={"train": 20, "test": 3}, image_size=(12, 20))
  damaged = folder_fixture.damage(root)
  workdir = str(tmp_path / "w")
  rc, out = _run(capfd, workdir, f"--config.dataset=folder:{root}")
  assert rc == 0, out
  assert "warning: skipped 2 damaged image file(s)" in out
  assert damaged[0] in out and damaged[1] in out
  rows = metrics.read_jsonl(workdir)
  assert [r["data/skipped_images"] for r in rows
          if "data/skipped_images" in r] == [2]
  _check(workdir, 3, 9)
  rc, out = _run(capfd, str(tmp_path / "strict"),
                 f"--config.dataset=folder:{root}",
                 "--config.pp.strict_images=True")
  assert rc == 1, out
  lines = out.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out
  assert f"damaged image {damaged[0]}" in lines[0]


def test_missing_tfds_dataset_is_one_line(capfd, tmp_path):
  rc, out = _run(capfd, str(tmp_path / "w"), "--config.dataset=tfds:absent",
                 f"--config.data_dir={tmp_path}")
  assert rc == 1 and out.startswith("error: cannot load dataset"), out
  assert "Traceback" not in out
