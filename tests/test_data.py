"""Tests of the input pipeline: sources, preprocessing, loaders."""

import importlib.util
import json
import math
import os
import re

import folder_fixture
import numpy as np
import PIL.Image
import pytest
import sklearn.datasets
import tfds_fixture

from vit_jax import data
from vit_jax import errors
from vit_jax import sharding
from vit_jax.data import preprocess
from vit_jax.data import sources
from vit_jax.evaluators import common


def _index_source(num, size=(2, 2)):
  """Source whose example i has label i and constant pixels 5 * i."""
  images = np.broadcast_to(
      (5 * np.arange(num, dtype=np.uint8))[:, None, None, None],
      (num, *size, 1))
  return data.ArraySource(images, np.arange(num), num_classes=num,
                          name=f"index{num}")


def _plain_loader(source, global_batch_size, **kwargs):
  """Loader without augmentation: outputs identify their examples."""
  return data.train_loader(source, global_batch_size, image_size=(2, 2),
                           inception_crop=False, flip=False, **kwargs)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])


# Digits.


def test_digits_sizes_and_pixels():
  train = data.get_source("digits", "train")
  test = data.get_source("digits", "test")
  assert (len(train), len(test)) == (1437, 360)
  assert train.num_classes == 10 and len(train.class_names) == 10
  assert train.num_channels == 1
  example = train[5]
  assert example["image"].shape == (8, 8, 1)
  assert example["image"].dtype == np.uint8
  # The split is a partition of all 1797 images.
  train_index, test_index = sources.digits_split_indices()
  assert not set(train_index) & set(test_index)
  assert len(set(train_index) | set(test_index)) == 1797
  # Pixels 0..16 map to 0..255.
  raw = sklearn.datasets.load_digits()
  i = train_index[5]
  np.testing.assert_array_equal(
      example["image"][..., 0],
      np.round(raw.images[i] * 255 / 16).astype(np.uint8))
  assert example["label"] == raw.target[i]
  assert max(int(train[j]["image"].max()) for j in range(50)) == 255


def test_digits_split_is_stratified_and_deterministic():
  raw_labels = sklearn.datasets.load_digits().target
  train = data.get_source("digits", "train")
  test = data.get_source("digits", "test")
  for split, total in ((train, 1437), (test, 360)):
    counts = np.bincount(split.labels, minlength=10)
    expected = np.bincount(raw_labels, minlength=10) * total / 1797
    assert np.all(np.abs(counts - expected) <= 1), (counts, expected)
  again = data.get_source("digits", "train")
  np.testing.assert_array_equal(train.images, again.images)
  np.testing.assert_array_equal(train.labels, again.labels)
  # The stored split is scikit-learn's.
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  expected = model_selection.train_test_split(
      np.arange(1797), test_size=sources.DIGITS_TEST_FRACTION,
      stratify=raw_labels, random_state=sources.DIGITS_SPLIT_SEED)
  for got, want in zip(sources.digits_split_indices(), expected):
    np.testing.assert_array_equal(got, np.sort(want))


def test_digits_unknown_split():
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    data.get_source("digits", "validation")


def test_digits_value_is_digits_with_float_labels():
  for split in ("train", "test"):
    digits = data.get_source("digits", split)
    values = data.get_source("digits_value", split)
    assert len(values) == len(digits)
    assert values.num_classes is None and values.class_names is None
    assert values.num_channels == 1
    assert values.label_dtype == np.float32
    assert data.label_dtype(values) == np.float32
    assert data.label_dtype(digits) == np.int32
    np.testing.assert_array_equal(values.images, digits.images)
    assert values.labels.dtype == np.float32
    np.testing.assert_array_equal(values.labels,
                                  digits.labels.astype(np.float32))
    example = values[3]
    assert isinstance(example["label"], float)
    assert example["label"] == float(digits[3]["label"])
    np.testing.assert_array_equal(example["image"], digits[3]["image"])
  assert set(values.labels.tolist()) == {float(v) for v in range(10)}
  with pytest.raises(ValueError, match='dataset "digits_value": unknown '
                     "split 'val'"):
    data.get_source("digits_value", "val")
  with pytest.raises(ValueError, match="digits_value takes no options"):
    data.get_source("digits_value", "train", num_channels=3)


# tfds.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  name = tfds_fixture.build_tiny_tfds(
      data_dir, name="tiny_digits_test", splits={"train": 40, "test": 12})
  return name, str(data_dir)


def test_tfds_source_reads_the_built_dataset(tfds_dir):
  name, data_dir = tfds_dir
  source = data.get_source(name, "train", data_dir=data_dir)
  assert len(source) == 40
  assert source.num_classes == 10
  assert source.class_names == [f"digit{i}" for i in range(10)]
  assert source.num_channels == 3
  # Same examples as generated (PNG is lossless; tfds reorders on write).
  images, labels = tfds_fixture.digit_images(40, (16, 16), 3, offset=0)
  written = sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))
  read = sorted((source[i]["image"].tobytes(), source[i]["label"])
                for i in range(len(source)))
  assert read == written
  assert source[0]["image"].shape == (16, 16, 3)
  assert source[0]["image"].dtype == np.uint8


def test_tfds_prefix_and_split_slicing(tfds_dir):
  name, data_dir = tfds_dir
  full = data.get_source(name, "train", data_dir=data_dir)
  head = data.get_source("tfds:" + name, "train[:25%]", data_dir=data_dir)
  assert len(head) == 10
  for i in range(10):
    np.testing.assert_array_equal(head[i]["image"], full[i]["image"])
  assert len(data.get_source(name, "test", data_dir=data_dir)) == 12


def test_tfds_unknown_feature_key(tfds_dir):
  name, data_dir = tfds_dir
  with pytest.raises(KeyError, match="no feature 'fine_label'"):
    data.get_source(name, "train", data_dir=data_dir, label_key="fine_label")


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow the dataset would be built")
def test_tfds_not_prepared_needs_tensorflow(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as error:
    data.get_source("cifar10", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "not prepared in " + str(tmp_path) in message
  assert 'pip install "vit_jax[tf]"' in message


def test_tfds_unknown_dataset(tmp_path):
  with pytest.raises(ValueError, match="not_a_dataset_xyz"):
    data.get_source("tfds:not_a_dataset_xyz", "train", data_dir=str(tmp_path))


def test_train_loader_on_tfds_resumes(tfds_dir):
  name, data_dir = tfds_dir
  source = data.get_source(name, "train", data_dir=data_dir)
  loader = data.train_loader(source, 8, image_size=(12, 12), seed=3)
  iterator = iter(loader)
  _take(iterator, 2)
  state = data.get_state(iterator)
  expected = _take(iterator, 4)
  resumed = iter(data.train_loader(
      data.get_source(name, "train", data_dir=data_dir), 8,
      image_size=(12, 12), seed=3))
  data.set_state(resumed, state)
  _assert_batches_equal(expected, _take(resumed, 4))
  assert expected[0]["image"].shape == (8, 12, 12, 3)


# Image folders.


def test_folder_classes_labels_and_pixels(tmp_path):
  root = folder_fixture.make_image_folder(
      tmp_path, classes=("zebra", "ant", "mole"),
      splits={"train": 3, "val": 2}, mode="L")
  source = data.get_source("folder:" + root, "train")
  assert source.class_names == ["ant", "mole", "zebra"]
  assert source.num_classes == 3 and len(source) == 9
  assert source.num_channels == 1
  for i in range(len(source)):
    path = source.files[i]
    assert os.path.basename(os.path.dirname(path)) == source.class_names[
        source[i]["label"]]
    np.testing.assert_array_equal(source[i]["image"][..., 0],
                                  np.asarray(PIL.Image.open(path)))
  assert len(data.get_source("folder:" + root, "val")) == 6


def test_folder_channels(tmp_path):
  rgb = folder_fixture.make_image_folder(tmp_path / "rgb", mode="RGB",
                                         ext="jpg")
  source = data.get_source("folder:" + rgb, "train")
  assert source[0]["image"].shape == (12, 16, 3)
  forced = data.get_source("folder:" + rgb, "train", num_channels=1)
  assert forced[0]["image"].shape == (12, 16, 1)
  mixed = folder_fixture.make_image_folder(
      tmp_path / "mixed", mode=["L", "RGBA", "L"], sizes=[(9, 7), (5, 11)])
  source = data.get_source("folder:" + mixed, "train")
  assert source.num_channels == 3
  assert {source[i]["image"].shape for i in range(len(source))} == {
      (9, 7, 3), (5, 11, 3)}
  gray = folder_fixture.make_image_folder(tmp_path / "gray", mode="L")
  forced = data.get_source("folder:" + gray, "train", num_channels=3)
  image = forced[0]["image"]
  assert image.shape == (12, 16, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_folder_alpha_is_composited_over_white(tmp_path):
  directory = tmp_path / "train" / "only"
  directory.mkdir(parents=True)
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[:2, :, :3] = (10, 20, 30)
  rgba[:2, :, 3] = 255      # top half opaque, bottom half transparent
  PIL.Image.fromarray(rgba, "RGBA").save(directory / "a.png")
  image = data.get_source(f"folder:{tmp_path}", "train")[0]["image"]
  np.testing.assert_array_equal(image[:2], np.broadcast_to([10, 20, 30],
                                                           (2, 4, 3)))
  np.testing.assert_array_equal(image[2:], np.full((2, 4, 3), 255))


def test_folder_layout_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source(f"folder:{tmp_path}/nowhere", "train")
  root = folder_fixture.make_image_folder(tmp_path / "ok", splits={"train": 1})
  with pytest.raises(FileNotFoundError,
                     match=r"no split directory 'test'; found splits \['train'"):
    data.get_source("folder:" + root, "test")
  (tmp_path / "flat" / "train").mkdir(parents=True)
  with pytest.raises(ValueError, match="no class subdirectories"):
    data.get_source(f"folder:{tmp_path}/flat", "train")
  (tmp_path / "ok" / "train" / "empty_class").mkdir()
  (tmp_path / "ok" / "train" / "empty_class" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"without .* images .*\['empty_class'\]"):
    data.get_source("folder:" + root, "train")


# One decoder: the same pixels in training, evaluation and few-shot.


def _gray_among_rgb(root):
  """RGB JPEGs with one grayscale PNG in every class of train and test."""
  folder_fixture.make_image_folder(root, splits={"train": 3, "test": 2},
                                   image_size=(8, 8), ext="jpg")
  gray = {}
  for split in ("train", "test"):
    for c, name in enumerate(("cat", "dog", "fish")):
      pixels = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3 + 20 * c)
      path = os.path.join(root, split, name, "gray.png")
      PIL.Image.fromarray(pixels, "L").save(path)
      gray[path] = pixels
  return str(root), gray


@pytest.mark.parametrize("num_channels", [None, 3])
def test_gray_png_among_rgb_jpegs_has_three_channels_everywhere(
    tmp_path, num_channels):
  root, gray = _gray_among_rgb(tmp_path)
  kwargs = {} if num_channels is None else {"num_channels": num_channels}
  train = data.get_source("folder:" + root, "train", **kwargs)
  test = data.get_source("folder:" + root, "test")
  assert train.num_channels == test.num_channels == 3
  assert data.image_channels(train, num_channels) == 3
  for source in (train, test):
    for i, path in enumerate(source.files):
      image = source[i]["image"]
      assert image.shape == (8, 8, 3)
      if path in gray:
        np.testing.assert_array_equal(image, np.repeat(gray[path][..., None],
                                                       3, -1))
  expected = {i: preprocess.normalize(train[i]["image"])
              for i in range(len(train))}
  # Training, without augmentation: every example, pixels as decoded.
  batch = next(iter(data.train_loader(
      train, len(train), (8, 8), inception_crop=False, flip=False,
      shuffle=False, num_channels=num_channels)))
  assert batch["image"].shape == (len(train), 8, 8, 3)
  for i in range(len(train)):
    np.testing.assert_array_equal(batch["image"][i], expected[i])
  # Augmented training batches have 3 channels too.
  batch = next(iter(data.train_loader(train, 6, (4, 4),
                                      num_channels=num_channels)))
  assert batch["image"].shape == (6, 4, 4, 3)
  # Evaluation: the same pixels as training.
  for source in (train, test):
    images = np.concatenate([b["image"] for b in data.eval_batches(
        source, 4, (8, 8), num_channels=num_channels)])[:len(source)]
    assert images.shape == (len(source), 8, 8, 3)
    for i in range(len(source)):
      np.testing.assert_array_equal(images[i],
                                    preprocess.normalize(source[i]["image"]))
  # The evaluators' path: a source from get_source(num_channels=None) read by
  # common.global_batches with the run's num_channels, as global arrays.
  mesh = sharding.make_mesh((("data", -1), ("model", 1)))
  source = data.get_source("folder:" + root, "test", num_channels=None)
  parts = [sharding.to_numpy(g) for g in common.global_batches(
      source, mesh, 8, (8, 8), num_channels=3)]
  images = np.concatenate([p["image"] for p in parts])
  index = np.concatenate([p["index"] for p in parts])
  mask = np.concatenate([p["mask"] for p in parts])
  assert images.shape[1:] == (8, 8, 3) and mask.sum() == len(source)
  for image, i in zip(images[mask], index[mask]):
    np.testing.assert_array_equal(image,
                                  preprocess.normalize(source[i]["image"]))
    if source.files[i] in gray:
      np.testing.assert_array_equal(
          image, preprocess.normalize(np.repeat(
              gray[source.files[i]][..., None], 3, -1)))


def test_one_channel_conversion_for_sources_and_loaders(tmp_path):
  # A folder decoded to gray equals the RGB folder converted by the loaders.
  root = folder_fixture.make_image_folder(tmp_path, image_size=(6, 6),
                                          mode=["RGB", "RGBA"], ext="png")
  rgb = data.get_source("folder:" + root, "train")
  gray = data.get_source("folder:" + root, "train", num_channels=1)
  assert (rgb.num_channels, gray.num_channels) == (3, 1)
  for i in range(len(rgb)):
    np.testing.assert_array_equal(
        gray[i]["image"], np.asarray(PIL.Image.open(rgb.files[i]).convert(
            "RGB").convert("L"))[..., None])
  options = dict(inception_crop=False, flip=False, shuffle=False)
  from_rgb = next(iter(data.train_loader(rgb, 12, (6, 6), num_channels=1,
                                         **options)))
  from_gray = next(iter(data.train_loader(gray, 12, (6, 6), **options)))
  _assert_batches_equal([from_rgb], [from_gray])
  _assert_batches_equal(list(data.eval_batches(rgb, 12, (6, 6),
                                               num_channels=1)),
                        list(data.eval_batches(gray, 12, (6, 6))))


def test_loaders_unify_channels_of_a_mixed_source():
  # A source without num_channels whose images differ: the first decides.
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (4, 4, c), np.uint8),
               "label": i} for i, c in enumerate([3, 1, 3, 1])]
  assert data.image_channels(examples) == 3
  assert data.image_channels(examples, 1) == 1
  batch = next(iter(_plain_loader(examples, 4, shuffle=False)))
  assert batch["image"].shape == (4, 2, 2, 3)
  batch = next(data.eval_batches(examples, 4, (4, 4)))
  for i, example in enumerate(examples):
    np.testing.assert_array_equal(batch["image"][i], preprocess.normalize(
        preprocess.to_channels(example["image"], 3)))
  batch = next(data.eval_batches(examples[1:], 4, (4, 4)))
  assert batch["image"].shape == (4, 4, 4, 1)


def test_decode_image_modes(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (5, 7, 3), np.uint8)
  PIL.Image.fromarray(rgb).save(tmp_path / "rgb.png")
  PIL.Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
  PIL.Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(
      tmp_path / "gray16.png")
  np.testing.assert_array_equal(data.decode_image(tmp_path / "rgb.png"), rgb)
  assert data.decode_image(tmp_path / "gray.png").shape == (5, 7, 1)
  np.testing.assert_array_equal(data.decode_image(tmp_path / "gray16.png"),
                                rgb[..., :1])
  np.testing.assert_array_equal(data.decode_image(tmp_path / "gray.png", 3),
                                np.repeat(rgb[..., :1], 3, -1))
  np.testing.assert_array_equal(
      data.decode_image(tmp_path / "rgb.png", 1),
      preprocess.to_channels(rgb, 1))


def test_exif_orientation_is_applied(tmp_path):
  # A phone photo: pixels stored sideways, EXIF orientation 6 ("rotate 90
  # degrees clockwise to view"). Upright: 16x24 of flat 8x8 blocks (JPEG
  # blocks, no chroma subsampling), so that the JPEG is near-lossless.
  rng = np.random.default_rng(0)
  upright = np.kron(rng.integers(0, 256, (2, 3, 3)),
                    np.ones((8, 8, 1))).astype(np.uint8)
  stored = np.rot90(upright, k=1)  # Counter-clockwise: sideways, 24x16.
  exif = PIL.Image.Exif()
  exif[0x0112] = 6
  path = tmp_path / "photo.jpg"
  PIL.Image.fromarray(np.ascontiguousarray(stored)).save(
      path, quality=95, subsampling=0, exif=exif.tobytes())
  image = data.decode_image(path)
  assert image.shape == (16, 24, 3)
  # The decoded stored pixels, turned clockwise: rotation is lossless.
  with PIL.Image.open(path) as raw:
    np.testing.assert_array_equal(
        image, np.rot90(np.asarray(raw.convert("RGB")), k=-1))
  # And upright within JPEG error: at most 4 levels on flat blocks.
  assert np.abs(image.astype(int) - upright).max() <= 4
  # Folders read it so too.
  (tmp_path / "root" / "train" / "a").mkdir(parents=True)
  os.replace(path, tmp_path / "root" / "train" / "a" / "photo.jpg")
  np.testing.assert_array_equal(
      data.get_source(f"folder:{tmp_path / 'root'}", "train")[0]["image"],
      image)


def test_16_bit_png_scales_by_the_format_range(tmp_path):
  # Two 16-bit grayscale PNGs: values up to 200 (dark) and the same values
  # times 257 (8-bit levels in 16 bits). v decodes to round(v * 255 / 65535)
  # whatever the image's own maximum: the dark one stays dark.
  dark = np.array([[0, 100, 128, 129], [150, 200, 200, 1]], np.uint16)
  PIL.Image.fromarray(dark).save(tmp_path / "dark.png")
  PIL.Image.fromarray(dark * 257).save(tmp_path / "bright.png")
  with PIL.Image.open(tmp_path / "dark.png") as image:
    assert image.mode.startswith("I")
  np.testing.assert_array_equal(data.decode_image(tmp_path / "dark.png"),
                                [[[0], [0], [0], [1]], [[1], [1], [1], [0]]])
  np.testing.assert_array_equal(data.decode_image(tmp_path / "bright.png"),
                                dark[..., None])


def test_hidden_folders_and_files_are_left_out(tmp_path):
  root = folder_fixture.make_image_folder(
      tmp_path, classes=("b", "c"), splits={"train": 2, "test": 1})
  (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
  PIL.Image.new("RGB", (16, 12)).save(
      tmp_path / "train" / ".ipynb_checkpoints" / "x.png")
  (tmp_path / "train" / "b" / "._b.png").write_bytes(b"")  # AppleDouble
  train = data.get_source("folder:" + root, "train")
  assert train.class_names == ["b", "c"] and len(train) == 4
  assert train.skipped == []
  # Another split with the training classes: a missing class is fine, an
  # unknown one is not.
  test = data.get_source("folder:" + root, "test",
                         class_names=["a", "b", "c"])
  assert [test[i]["label"] for i in range(len(test))] == [1, 2]
  with pytest.raises(ValueError, match=r"\['c'\] that are not among the "
                     r"training classes \['a', 'b'\]"):
    data.get_source("folder:" + root, "test", class_names=["a", "b"])


# Damaged image files.


def test_check_image_on_damaged_files(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (32, 32, 3), np.uint8)
  for name, options in (("good.jpg", {}), ("good.png", {}),
                        ("progressive.jpg", {"progressive": True})):
    PIL.Image.fromarray(pixels).save(tmp_path / name, **options)
  jpeg = (tmp_path / "good.jpg").read_bytes()
  png = (tmp_path / "good.png").read_bytes()
  progressive = (tmp_path / "progressive.jpg").read_bytes()
  damaged = {"half.jpg": jpeg[:len(jpeg) // 2],
             "no_end_marker.jpg": jpeg[:-2],
             "progressive_90.jpg": progressive[:len(progressive) * 9 // 10],
             "header.jpg": jpeg[:200],
             "half.png": png[:len(png) // 2],
             "no_iend.png": png[:-5],
             "x.jpg": b"this is not an image\n",
             "empty.png": b""}
  readable = {"trailing_data.jpg": jpeg + bytes(range(256)) * 8,
              "nul_padded.jpg": jpeg + b"\0" * 16,
              "png_named.jpg": png}
  for name, content in {**damaged, **readable}.items():
    (tmp_path / name).write_bytes(content)
  for name in ("good.jpg", "good.png", "progressive.jpg", *readable):
    assert sources.check_image(str(tmp_path / name)) == (None, "RGB"), name
  for name in damaged:
    reason, _ = sources.check_image(str(tmp_path / name))
    assert reason, name
  assert sources.check_image(str(tmp_path / "half.jpg"))[0].startswith(
      "truncated JPEG: no end marker FF D9, image file is truncated")
  assert sources.check_image(str(tmp_path / "half.png"))[0].startswith(
      "truncated file")
  assert sources.check_image(str(tmp_path / "x.jpg"))[0] == (
      "not an image file PIL can read")
  paths = sorted(str(p) for p in tmp_path.iterdir())
  bad, grayscale = data.check_images(paths)
  assert sorted(bad) == sorted(str(tmp_path / n) for n in damaged)
  assert not grayscale


def test_folder_skips_damaged_files(tmp_path):
  root = folder_fixture.make_image_folder(
      tmp_path, splits={"train": 20}, image_size=(8, 8), ext="jpg")
  damaged = folder_fixture.damage(root)
  source = data.get_source("folder:" + root, "train")
  assert len(source) == 58
  assert source.skipped == damaged
  assert set(source.skip_reasons) == set(damaged)
  assert "truncated" in source.skip_reasons[damaged[0]]
  assert "not an image" in source.skip_reasons[damaged[1]]
  assert not set(damaged) & set(source.files)
  assert source.num_classes == 3
  assert np.bincount(source.labels).tolist() == [19, 20, 19]
  for i, path in enumerate(source.files):
    assert os.path.basename(os.path.dirname(path)) == source.class_names[
        source.labels[i]]
  # The same on a second build (another process reads the same files).
  again = sources.FolderSource(root, "train")
  assert again.files == source.files and again.skipped == source.skipped
  # The loaders run over it.
  loader = data.train_loader(source, 16, (8, 8), seed=1)
  for batch in _take(iter(loader), 5):
    assert batch["image"].shape == (16, 8, 8, 3)
  batches = list(data.eval_batches(source, 16, (8, 8)))
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 58
  np.testing.assert_array_equal(labels[mask], source.labels)
  # Sources without files to damage have none skipped.
  assert data.get_source("digits", "test").skipped == []


def test_strict_images_names_the_first_damaged_file(tmp_path):
  root = folder_fixture.make_image_folder(
      tmp_path, splits={"train": 20}, image_size=(8, 8), ext="jpg")
  damaged = folder_fixture.damage(root)
  with pytest.raises(errors.Error) as raised:
    data.get_source("folder:" + root, "train", strict_images=True)
  message = str(raised.value)
  assert f"damaged image {damaged[0]} (truncated" in message
  assert damaged[1] not in message
  assert message.endswith("remove it, or drop --config.pp.strict_images to "
                          "skip damaged files")
  assert "\n" not in message
  # Without damage, strict_images changes nothing.
  clean = folder_fixture.make_image_folder(tmp_path / "clean",
                                           splits={"train": 2})
  assert len(data.get_source("folder:" + clean, "train",
                             strict_images=True)) == 6


def test_strict_images_is_accepted_by_every_source(tfds_dir, tmp_path):
  name, data_dir = tfds_dir
  for strict in (False, True):
    for dataset in ("digits", "digits_value"):
      source = data.get_source(dataset, "test", data_dir=str(tmp_path),
                               strict_images=strict)
      assert len(source) == 360 and source.skipped == []
    source = data.get_source(name, "test", data_dir=data_dir,
                             strict_images=strict)
    assert len(source) == 12 and source.skipped == []


def test_a_folder_of_damaged_files_only(tmp_path):
  folder_fixture.write_not_an_image(str(tmp_path / "train" / "a" / "x.jpg"))
  with pytest.raises(errors.Error, match=r"none of its 1 images can be read, "
                     r"e\.g\. .*x\.jpg \(not an image"):
    data.get_source(f"folder:{tmp_path}", "train")


def test_decode_failure_at_read_time_names_the_file(tmp_path):
  root = folder_fixture.make_image_folder(tmp_path, splits={"train": 2},
                                          ext="jpg")
  source = data.get_source("folder:" + root, "train")
  path = folder_fixture.truncate(source.files[1])   # damaged after the check
  match = re.escape(f"cannot decode image {path} (")
  with pytest.raises(errors.Error, match=match):
    source[1]   # pylint: disable=pointless-statement
  with pytest.raises(errors.Error, match=match):
    next(iter(_plain_loader(source, 6, shuffle=False)))
  with pytest.raises(errors.Error, match=match):
    list(data.eval_batches(source, 6, (4, 4)))


# Image folders with float labels (labels.csv).


def _write_png(path, value, size=(4, 6)):
  """A constant grayscale PNG of pixel `value`."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(np.full(size, value, np.uint8), "L").save(path)


def _labels_csv_folder(root, rows, split="train", header="filename,label",
                       write=None):
  """Writes `root/<split>/labels.csv` with `rows` of (filename, label text).

  Every filename in `write` (default: all of them) gets a PNG whose pixels
  are 10 * its row index.
  """
  split_dir = os.path.join(root, split)
  os.makedirs(split_dir, exist_ok=True)
  names = [name for name, _ in rows] if write is None else write
  for i, (name, _) in enumerate(rows):
    if name in names:
      _write_png(os.path.join(split_dir, name), 10 * i)
  with open(os.path.join(split_dir, "labels.csv"), "w") as f:
    f.write(header + "\n")
    for name, label in rows:
      f.write(f"{name},{label}\n")
  return str(root)


_CSV_ROWS = [("b.png", "0.5"), ("sub/a.png", "-1.25"), ("sub/deep/c.png", "3"),
             ("d.png", "1e-3"), ("e.png", " 7.75 ")]
_CSV_VALUES = np.array([0.5, -1.25, 3.0, 1e-3, 7.75], np.float32)


def test_labels_csv_folder_source(tmp_path):
  root = _labels_csv_folder(tmp_path, _CSV_ROWS)
  source = data.get_source("folder:" + root, "train")
  assert len(source) == 5
  assert source.num_classes is None and source.class_names is None
  assert source.label_dtype == np.float32 and source.num_channels == 1
  # CSV order, subfolders allowed.
  assert source.files == [os.path.join(root, "train", name)
                          for name, _ in _CSV_ROWS]
  for i in range(len(source)):
    example = source[i]
    assert isinstance(example["label"], float)
    assert np.float32(example["label"]) == _CSV_VALUES[i]
    np.testing.assert_array_equal(example["image"],
                                  np.full((4, 6, 1), 10 * i, np.uint8))
  with pytest.raises(ValueError, match=r"\(float labels\) but class"):
    data.get_source("folder:" + root, "train", class_names=["a"])


def test_labels_csv_folder_through_loaders(tmp_path):
  root = _labels_csv_folder(tmp_path, _CSV_ROWS)
  source = data.get_source("folder:" + root, "train")
  # Without augmentation or shuffling the batches are the CSV in order.
  batch = next(iter(_plain_loader(source, 5, shuffle=False)))
  assert batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], _CSV_VALUES)
  np.testing.assert_array_equal(
      batch["image"][:, 0, 0, 0],
      preprocess.normalize(10 * np.arange(5, dtype=np.uint8)))
  # With augmentation, over several epochs: every label is a CSV value.
  loader = data.train_loader(source, 4, image_size=(3, 3), seed=1)
  for batch in _take(iter(loader), 5):
    assert batch["label"].dtype == np.float32
    assert set(batch["label"].tolist()) <= set(_CSV_VALUES.tolist())
  batches = list(data.eval_batches(source, 4, (4, 6)))
  assert len(batches) == 2
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert labels.dtype == np.float32
  np.testing.assert_array_equal(labels[mask], _CSV_VALUES)
  np.testing.assert_array_equal(labels[~mask], np.zeros(3, np.float32))


def test_labels_csv_is_per_split(tmp_path):
  # A split with labels.csv has float labels; one without keeps classes.
  root = folder_fixture.make_image_folder(tmp_path, splits={"test": 1})
  _labels_csv_folder(tmp_path, _CSV_ROWS)
  assert data.get_source("folder:" + root, "train").label_dtype == np.float32
  classes = data.get_source("folder:" + root, "test")
  assert classes.label_dtype == np.int32 and classes.num_classes == 3


@pytest.mark.parametrize("rows, header, write, error, match", [
    ([("a.png", "1"), ("b.png", "2")], "filename,label", ["a.png"],
     FileNotFoundError, r"labels.csv line 3: image 'b.png' does not exist"),
    ([("a.png", "1"), ("b.png", "two")], "filename,label", None,
     ValueError, r"labels.csv line 3: label 'two' of 'b.png' is not a finite "
     "float"),
    ([("a.png", "nan")], "filename,label", None,
     ValueError, r"labels.csv line 2: label 'nan'"),
    ([("a.png", "1")], "filename,target", None,
     ValueError, r"labels.csv line 1: .* lacks the column\(s\) \['label'\]"),
    ([("a.png", "1")], "label", None,
     ValueError, r"lacks the column\(s\) \['filename'\]"),
    ([], "filename,label", None, ValueError, "lists no images"),
], ids=["missing_file", "not_a_float", "nan", "no_label_column",
        "no_filename_column", "empty"])
def test_labels_csv_errors(tmp_path, rows, header, write, error, match):
  root = _labels_csv_folder(tmp_path, rows, header=header, write=write)
  with pytest.raises(error, match=match) as raised:
    data.get_source("folder:" + root, "train")
  assert os.path.join(root, "train", "labels.csv") in str(raised.value)


def test_labels_csv_short_row(tmp_path):
  root = _labels_csv_folder(tmp_path, [("a.png", "1")])
  with open(os.path.join(root, "train", "labels.csv"), "a") as f:
    f.write("\nb.png\n")    # a blank line is skipped, a short row is not
  with pytest.raises(ValueError, match=r"labels.csv line 4: expected the "
                     r"columns \['filename', 'label'\], got \['b.png'\]"):
    data.get_source("folder:" + root, "train")


# Label dtypes.


def test_integer_labels_stay_int32(tmp_path):
  root = folder_fixture.make_image_folder(tmp_path, splits={"train": 2},
                                          image_size=(4, 4))
  float_indices = data.ArraySource(np.zeros((4, 2, 2, 1), np.uint8),
                                   np.array([0.0, 1.0, 2.0, 1.0]),
                                   num_classes=3, label_dtype=np.int32)
  for source in (_index_source(8), data.get_source("digits", "test"),
                 data.get_source("folder:" + root, "train"), float_indices):
    assert data.label_dtype(source) == np.int32
    assert isinstance(source[0]["label"], int)
    batch = next(iter(_plain_loader(source, 4)))
    assert batch["label"].dtype == np.int32
    batch = next(data.eval_batches(source, 4, (2, 2)))
    assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(float_indices.labels, [0, 1, 2, 1])


def test_array_source_float_labels():
  images = np.zeros((3, 2, 2, 1), np.uint8)
  source = data.ArraySource(images, np.array([0.25, -2.0, 4.5]), name="f")
  assert source.num_classes is None
  assert source.label_dtype == np.float32 and source.labels.dtype == np.float32
  assert source[0]["label"] == 0.25
  batch = next(data.eval_batches(source, 4, (2, 2)))
  assert batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], [0.25, -2.0, 4.5, 0.0])
  # Float-typed values read as float unless label_dtype says otherwise.
  assert data.ArraySource(images, [1.0, 2.0, 3.0], 0).label_dtype == np.float32


def test_label_dtype_of_a_source_without_the_attribute():
  image = np.zeros((2, 2, 1), np.uint8)
  floats = [{"image": image, "label": v} for v in (0.5, 1.5, 2.5, 3.5)]
  ints = [{"image": image, "label": v} for v in (0, 1, 2, 3)]
  assert data.label_dtype(floats) == np.float32
  assert data.label_dtype(ints) == np.int32
  batch = next(data.eval_batches(floats, 4, (2, 2)))
  assert batch["label"].dtype == np.float32
  np.testing.assert_array_equal(batch["label"], [0.5, 1.5, 2.5, 3.5])
  batch = next(data.eval_batches(ints, 4, (2, 2)))
  assert batch["label"].dtype == np.int32


def test_digits_value_loaders_give_float32():
  source = data.get_source("digits_value", "test")
  batch = next(iter(data.train_loader(source, 8, image_size=(8, 8))))
  assert batch["label"].dtype == np.float32
  assert set(batch["label"].tolist()) <= {float(v) for v in range(10)}
  batches = list(data.eval_batches(source, 64, (8, 8)))
  labels = np.concatenate([b["label"] for b in batches])[:360]
  assert labels.dtype == np.float32
  np.testing.assert_array_equal(labels, source.labels)


# Preprocessing.


def test_train_image_shape_and_range():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  out = preprocess.train_image(image, rng, (16, 24))
  assert out.shape == (16, 24, 3) and out.dtype == np.float32
  assert out.min() >= -1 and out.max() <= 1
  np.testing.assert_array_equal(
      preprocess.normalize(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  gray = preprocess.train_image(image, rng, 8, num_channels=1)
  assert gray.shape == (8, 8, 1)


def test_flip_mirrors_the_image():
  image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
  plain = preprocess.normalize(image)
  seen = set()
  for seed in range(16):
    out = preprocess.train_image(image, np.random.default_rng(seed), (4, 6),
                                 inception_crop=False, flip=True)
    if np.array_equal(out, plain):
      seen.add("same")
    else:
      np.testing.assert_array_equal(out, plain[:, ::-1])
      seen.add("flipped")
  assert seen == {"same", "flipped"}


def test_central_crop_of_a_hand_made_image():
  # Columns 0..7 hold the values 0, 10, ..., 70; rows are identical.
  image = np.broadcast_to((10 * np.arange(8, dtype=np.uint8))[None, :, None],
                          (4, 8, 1)).copy()
  out = preprocess.eval_image(image, (4, 4))
  np.testing.assert_array_equal(out, preprocess.normalize(image[:, 2:6]))
  # Tall target aspect ratio: full height, central 2 of 8 columns.
  out = preprocess.eval_image(image, (4, 2))
  np.testing.assert_array_equal(out, preprocess.normalize(image[:, 3:5]))
  # crop_fraction: the central half of a square image.
  square = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
  out = preprocess.eval_image(square, (4, 4), crop_fraction=0.5)
  np.testing.assert_array_equal(out, preprocess.normalize(square[2:6, 2:6]))
  # Upscaling a constant image keeps it constant.
  out = preprocess.eval_image(np.full((3, 3, 3), 200, np.uint8), (9, 9))
  np.testing.assert_allclose(out, (200 - 127.5) / 127.5, rtol=1e-6)


def test_inception_crop_box_bounds():
  rng = np.random.default_rng(0)
  height, width = 90, 120
  areas = []
  for _ in range(300):
    top, left, h, w = preprocess.inception_crop_box(
        height, width, rng, area=(0.2, 0.6), aspect_ratio=(0.75, 4 / 3))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    area = h * w / (height * width)
    # Rounding of the box sides changes the area by at most a few percent.
    assert 0.2 * 0.95 <= area <= 0.6 * 1.05
    assert 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05
    areas.append(area)
  assert min(areas) < 0.25 and max(areas) > 0.55
  # No box of at least 90% of the area fits a 10 x 1000 image with a ratio of
  # at most 4/3: central crop with the ratio clipped to 4/3.
  box = preprocess.inception_crop_box(10, 1000, rng, area=(0.9, 1.0))
  assert box == (0, (1000 - 13) // 2, 10, 13)


def test_channel_conversion():
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  # RGB -> gray is PIL's convert("L"), bit for bit.
  np.testing.assert_array_equal(
      preprocess.to_channels(rgb, 1)[..., 0],
      np.asarray(PIL.Image.fromarray(rgb).convert("L")))
  gray = rgb[..., :1]
  np.testing.assert_array_equal(preprocess.to_channels(gray, 3),
                                np.repeat(gray, 3, -1))
  assert preprocess.to_channels(rgb, None) is rgb
  # Alpha is composited over white, as PIL's alpha_composite does.
  rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
  white = PIL.Image.new("RGBA", (6, 5), (255, 255, 255, 255))
  over = PIL.Image.alpha_composite(white, PIL.Image.fromarray(rgba, "RGBA"))
  np.testing.assert_array_equal(preprocess.to_channels(rgba, 3),
                                np.asarray(over.convert("RGB")))
  np.testing.assert_array_equal(preprocess.to_channels(rgba, 1)[..., 0],
                                np.asarray(over.convert("L")))
  la = np.stack([rgb[..., 0], np.full((5, 6), 0, np.uint8)], -1)
  np.testing.assert_array_equal(preprocess.to_channels(la, 1),
                                np.full((5, 6, 1), 255))
  with pytest.raises(ValueError, match="5 channels to 3"):
    preprocess.to_channels(rng.integers(0, 256, (2, 2, 5), np.uint8), 3)
  with pytest.raises(ValueError, match="3 channels to 2"):
    preprocess.to_channels(rgb, 2)


# Training loader.


def test_processes_share_one_global_stream():
  source = _index_source(40)
  single = _take(iter(_plain_loader(source, 8, seed=5)), 10)
  labels = np.concatenate([b["label"] for b in single])
  # The image identifies the example: pixels are 5 * label.
  pixels = np.concatenate([b["image"][:, 0, 0, 0] for b in single])
  np.testing.assert_array_equal(
      pixels, preprocess.normalize((5 * labels).astype(np.uint8)))
  first, second = labels[:40], labels[40:]
  assert set(first) == set(second) == set(range(40))   # whole epochs
  assert not np.array_equal(first, second)   # reshuffled per epoch
  per_process = [_take(iter(_plain_loader(source, 8, seed=5, process_index=p,
                                          process_count=2)), 10)
                 for p in (0, 1)]
  for step, batch in enumerate(single):
    halves = [per_process[p][step]["label"] for p in (0, 1)]
    assert all(h.shape == (4,) and h.dtype == np.int32 for h in halves)
    # Process p reads every second position: the union is the global batch.
    np.testing.assert_array_equal(batch["label"][0::2], halves[0])
    np.testing.assert_array_equal(batch["label"][1::2], halves[1])


def test_loader_is_deterministic_by_seed():
  source = data.get_source("digits", "train")

  def first_batches(seed):
    loader = data.train_loader(source, 16, image_size=(10, 10), seed=seed)
    return _take(iter(loader), 3)

  _assert_batches_equal(first_batches(7), first_batches(7))
  other = first_batches(8)
  assert not np.array_equal(first_batches(7)[0]["label"], other[0]["label"])


def test_state_restore_reproduces_batches_bitwise():
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 256, (20, 12, 12, 3), np.uint8),
                            rng.integers(0, 4, 20), num_classes=4, name="rand")
  loader = data.train_loader(source, 8, image_size=(8, 8), seed=11,
                             process_index=1, process_count=2)
  iterator = iter(loader)
  _take(iterator, 3)               # shard of 10, batches of 4: crosses epochs
  state = data.get_state(iterator)
  assert isinstance(state, str)
  json.loads(state)
  expected = _take(iterator, 5)
  resumed = iter(data.train_loader(source, 8, image_size=(8, 8), seed=11,
                                   process_index=1, process_count=2))
  data.set_state(resumed, state)
  _assert_batches_equal(expected, _take(resumed, 5))
  # Augmentation is random: the same example is cropped differently later.
  assert expected[0]["image"].std() > 0


def test_loader_batch_size_and_channels():
  source = data.get_source("digits", "test")
  batch = next(iter(data.train_loader(source, 12, image_size=(6, 6),
                                      process_count=3, process_index=2,
                                      num_channels=3)))
  assert batch["image"].shape == (4, 6, 6, 3)
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
  with pytest.raises(ValueError, match="10 is not divisible by the number of "
                     "processes 4"):
    data.train_loader(source, 10, image_size=8, process_count=4)


def test_loader_on_folder_with_mixed_sizes(tmp_path):
  root = folder_fixture.make_image_folder(tmp_path, sizes=[(9, 7), (20, 11)])
  source = data.get_source("folder:" + root, "train")
  batch = next(iter(data.train_loader(source, 6, image_size=(8, 8))))
  assert batch["image"].shape == (6, 8, 8, 3)


def test_batch_resampling_is_pil_bilinear_within_one_level():
  rng = np.random.default_rng(3)
  exact = total = 0
  for channels, (height, width), size in [(1, (8, 8), (16, 16)),
                                          (3, (30, 21), (7, 12)),
                                          (2, (5, 9), (9, 4)),
                                          (4, (64, 64), (16, 16))]:
    images = rng.integers(0, 256, (6, height, width, channels), np.uint8)
    box_h = rng.integers(1, height + 1, 6)
    box_w = rng.integers(1, width + 1, 6)
    boxes = np.stack([rng.integers(0, height - box_h + 1),
                      rng.integers(0, width - box_w + 1), box_h, box_w], 1)
    out = preprocess.resize(images, boxes, size)
    assert out.shape == (6, *size, channels) and out.dtype == np.uint8
    for image, box, result in zip(images, boxes, out):
      top, left, h, w = (int(v) for v in box)
      planes = [np.asarray(PIL.Image.fromarray(image[..., c]).resize(
          size[::-1], PIL.Image.BILINEAR, box=(left, top, left + w, top + h)))
                for c in range(channels)]
      diff = np.abs(np.stack(planes, -1).astype(int) - result)
      assert diff.max() <= 1
      exact += int(not diff.any())
      total += 1
  assert exact >= total // 2
  # Images of different sizes (PIL, one by one) get what they get alone.
  mixed = [images[0], images[1, :40, :50]]
  out = preprocess.resize(mixed, [(0, 0, 64, 64), (2, 3, 30, 40)], (9, 9))
  np.testing.assert_array_equal(
      out[1], preprocess.crop_and_resize(mixed[1], (2, 3, 30, 40), (9, 9)))


def _inception_box_by_hand(height, width, u, area, ratio=(3 / 4, 4 / 3)):
  """The random resized crop of one image from its uniform numbers `u`.

  Ten attempts (area fraction uniform in `area`, aspect ratio w / h
  log-uniform in `ratio`, sides rounded); the first that fits is placed at
  (floor(u[20] * (H - h + 1)), floor(u[21] * (W - w + 1))); none: the whole
  image, centred, its ratio clipped.
  """
  for a in range(10):
    target = height * width * (area[0] + (area[1] - area[0]) * u[2 * a])
    r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(
        ratio[0])) * u[2 * a + 1])
    w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
    if 0 < w <= width and 0 < h <= height:
      return (math.floor(u[20] * (height - h + 1)),
              math.floor(u[21] * (width - w + 1)), h, w)
  h, w = height, width
  if width / height < ratio[0]:
    h = max(1, round(width / ratio[0]))
  if width / height > ratio[1]:
    w = max(1, round(height * ratio[1]))
  return (height - h) // 2, (width - w) // 2, h, w


def _pil_crop_resize(image, box, size):
  top, left, h, w = box
  return np.asarray(PIL.Image.fromarray(image).resize(
      size[::-1], PIL.Image.BILINEAR, box=(left, top, left + w, top + h)))


def test_train_and_eval_batch_by_hand():
  """Each row: the crop from its numbers, PIL's bilinear resize (within one
  level of 255), the flip when u[-1] < 0.5, (x - 127.5) / 127.5."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 12, 10, 3), np.uint8)
  u = rng.random((6, preprocess.RANDOMS_PER_IMAGE))
  # Image 5: every attempt asks for 99.9% of the area at a ratio of 3/4,
  # 9x13 pixels, which does not fit: the fallback, the whole image.
  u[5, :20:2], u[5, 1:20:2] = 0.999, 0.0
  options = dict(image_size=(6, 4), crop_area=(0.3, 1.0), flip=True)
  batch = preprocess.train_batch(images, u, **options)
  level = 1 / 127.5 + 1e-6
  boxes, flips = set(), set()
  for i in range(6):
    box = _inception_box_by_hand(12, 10, u[i], (0.3, 1.0))
    boxes.add(box)
    want = _pil_crop_resize(images[i], box, (6, 4)).astype(np.float64)
    if u[i, -1] < 0.5:
      want = want[:, ::-1]
    flips.add(bool(u[i, -1] < 0.5))
    np.testing.assert_allclose(batch[i], (want - 127.5) / 127.5, rtol=0,
                               atol=level, err_msg=f"image {i}")
  assert len(boxes) == 6 and flips == {True, False}
  assert _inception_box_by_hand(12, 10, u[5], (0.3, 1.0)) == (0, 0, 12, 10)
  # One image with the same numbers gives the same pixels.
  np.testing.assert_array_equal(
      preprocess.train_image(images[2], _Row(u[2]), **options), batch[2])
  # An image's crop and flip depend on its own row of numbers only.
  np.testing.assert_array_equal(
      preprocess.train_batch(images[3:], u[3:], **options), batch[3:])
  # Evaluation: the largest central box of the target's aspect ratio, 12x8
  # of 12x10 for 6x4, at (0, 1).
  out = preprocess.eval_batch(images, (6, 4))
  for i in range(6):
    want = _pil_crop_resize(images[i], (0, 1, 12, 8), (6, 4))
    np.testing.assert_allclose(out[i], (want - 127.5) / 127.5, rtol=0,
                               atol=level)


class _Row:
  """A generator whose numbers are one given row."""

  def __init__(self, row):
    self.row = row

  def random(self, shape):
    return self.row.reshape(shape)


def test_loader_reads_folders_in_threads_with_the_same_batches(tmp_path):
  root = folder_fixture.make_image_folder(tmp_path, splits={"train": 5},
                                          ext="jpg")

  def batches(read_threads):
    source = data.get_source("folder:" + root, "train")
    loader = data.train_loader(source, 6, (8, 8), seed=2,
                               read_threads=read_threads)
    return _take(iter(loader), 4), source

  threaded, source = batches(4)
  _assert_batches_equal(batches(0)[0], threaded)
  # Every image was decoded once and kept: later epochs read memory.
  assert source.cached_bytes == sum(
      np.asarray(source[i]["image"]).nbytes for i in range(len(source)))
  for path in source.files:
    os.remove(path)
  assert not source[0]["image"].flags.writeable
  next(iter(data.train_loader(source, 6, (8, 8))))


def test_folder_cache_is_bounded(tmp_path, monkeypatch):
  root = folder_fixture.make_image_folder(tmp_path, splits={"train": 3},
                                          image_size=(4, 5), mode="L")
  monkeypatch.setattr(sources, "_CACHE",
                      sources._CacheBudget(2 * 4 * 5))  # Two images.
  source = data.get_source("folder:" + root, "train")
  other = data.get_source("folder:" + root, "train")
  _ = [source[i] for i in range(len(source))]
  _ = [other[i] for i in range(len(other))]
  assert source.cached_bytes == 2 * 4 * 5 and other.cached_bytes == 0
  del source
  other[0]  # pylint: disable=pointless-statement
  assert other.cached_bytes == 4 * 5  # The dropped source's share is free.


def test_loader_state_names_what_differs_and_reads_grain_states():
  source = data.get_source("digits", "train[:40]")
  iterator = iter(data.train_loader(source, 8, (8, 8), seed=1,
                                    process_index=1, process_count=2))
  _take(iterator, 3)
  state = json.loads(data.get_state(iterator))
  assert state["next_batch"] == 3 and state["seed"] == 1
  other = iter(data.train_loader(source, 8, (8, 8), seed=2))
  with pytest.raises(ValueError, match="saved with seed=1 but this loader "
                     "has seed=2"):
    data.set_state(other, data.get_state(iterator))
  # grain's state (the loader of earlier versions): the same position.
  grain_state = {"version": 2, "last_seen_indices": {"0": 8 * 3 - 1},
                 "last_worker_index": -1, "worker_count": 0}
  resumed = iter(data.train_loader(source, 8, (8, 8), seed=1,
                                   process_index=1, process_count=2))
  data.set_state(resumed, json.dumps(grain_state))
  _assert_batches_equal(_take(resumed, 2), _take(iterator, 2))
  with pytest.raises(ValueError, match="worker_count=2"):
    data.set_state(resumed, json.dumps(dict(grain_state, worker_count=2)))


# Evaluation batches.


@pytest.mark.parametrize("num, global_batch, process_count",
                         [(37, 12, 1), (37, 12, 2), (37, 12, 3), (37, 12, 4),
                          (5, 4, 4), (24, 8, 2)])
def test_eval_batches_cover_every_example_once(num, global_batch,
                                               process_count):
  source = _index_source(num)
  local = global_batch // process_count
  expected_batches = data.num_eval_batches(num, global_batch, process_count)
  seen = []
  for process in range(process_count):
    batches = list(data.eval_batches(source, global_batch, (2, 2),
                                     process_index=process,
                                     process_count=process_count))
    assert len(batches) == expected_batches
    for batch in batches:
      assert batch["image"].shape == (local, 2, 2, 1)
      assert batch["label"].shape == batch["mask"].shape == (local,)
      assert batch["mask"].dtype == bool
      labels = batch["label"][batch["mask"]]
      np.testing.assert_array_equal(
          batch["image"][batch["mask"], 0, 0, 0],
          preprocess.normalize((5 * labels).astype(np.uint8)))
      assert not batch["image"][~batch["mask"]].any()
      seen.extend(labels.tolist())
  assert sorted(seen) == list(range(num))
  # Padding never exceeds one batch per process.
  assert expected_batches * global_batch - num < global_batch * 2


def test_eval_batches_preserve_pixels():
  source = data.get_source("digits", "test")
  batches = list(data.eval_batches(source, 64, (8, 8)))
  images = np.concatenate([b["image"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 360 and not mask[360:].any()
  np.testing.assert_array_equal(images[:360],
                                preprocess.normalize(source.images))


def test_digits_split_slices():
  train = data.get_source("digits", "train")
  tenth = data.get_source("digits", "train[:10%]")
  assert len(tenth) == 144  # round(1437 / 10)
  np.testing.assert_array_equal(tenth.images, train.images[:144])
  np.testing.assert_array_equal(tenth.labels, train.labels[:144])
  assert set(tenth.labels.tolist()) == set(range(10))
  rest = data.get_source("digits", "train[10%:]")
  assert len(rest) + len(tenth) == len(train)
  np.testing.assert_array_equal(
      data.get_source("digits", "test[-50:]").labels,
      data.get_source("digits", "test").labels[-50:])
  with pytest.raises(ValueError, match="is empty"):
    data.get_source("digits", "train[5:5]")
  with pytest.raises(ValueError, match="unknown split 'train\\[:x\\]'"):
    data.get_source("digits", "train[:x]")


def test_digits_canvas():
  digits = data.get_source("digits", "train")
  canvas = data.get_source("digits_canvas", "train")
  assert len(canvas) == len(digits) and canvas.num_classes == 10
  np.testing.assert_array_equal(canvas.labels, digits.labels)
  assert canvas.images.shape[1:] == (32, 32, 1)
  corners = []
  for i in range(20):
    big = np.asarray(digits[i]["image"]).repeat(2, 0).repeat(2, 1)
    image = np.asarray(canvas[i]["image"])
    # The 2x digit is somewhere on the canvas, and nothing else is drawn.
    found = [(y, x) for y in range(17) for x in range(17)
             if np.array_equal(image[y:y + 16, x:x + 16], big)]
    assert found, i
    assert image.sum() == big.sum()
    corners.append(found[0])
  assert len(set(corners)) > 10  # Positions vary.
  # A slice sees the same images (positions fixed per example).
  np.testing.assert_array_equal(
      data.get_source("digits_canvas", "train[:10]").images,
      canvas.images[:10])
