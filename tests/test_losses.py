"""Tests for vit_jax.losses, the classification task's loss, vit_jax.masking."""

import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import data
from vit_jax import losses
from vit_jax import masking
from vit_jax import metrics
from vit_jax import models
from vit_jax import tasks
from vit_jax import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sharding import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_softmax_xent_by_hand():
  logits = np.array([[1., 2., 3.], [0., -1., 4.]], np.float32)
  labels = np.array([[0., 0., 1.], [.5, .5, 0.]], np.float32)
  per_example = -(labels * _log_softmax(logits.astype(np.float64))).sum(-1)
  np.testing.assert_allclose(
      losses.softmax_xent(logits, labels, reduction=False), per_example,
      rtol=1e-6)
  np.testing.assert_allclose(losses.softmax_xent(logits, labels),
                             per_example.mean(), rtol=1e-6)


def test_sigmoid_xent_by_hand():
  logits = np.array([[1., -2.], [0.5, 3.]], np.float32)
  labels = np.array([[1., 0.], [0., 1.]], np.float32)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  nll = -(labels * np.log(p) + (1 - labels) * np.log(1 - p)).sum(-1)
  np.testing.assert_allclose(losses.sigmoid_xent(logits, labels), nll.mean(),
                             rtol=1e-6)


def _task_config(loss, smoothing):
  return ml_collections.ConfigDict(dict(
      task="classification", loss=loss, label_smoothing=smoothing,
      model=dict(num_classes=None)))


@pytest.fixture(scope="module")
def model_batch_logits():
  """A tiny 10-class model with random parameters (the head too), a batch
  of digits and its logits."""
  model = models.create("testing", image_size=8, patch_size=4,
                        num_channels=1, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(scale=0.5, size=s.shape).astype(np.float32),
      shapes["params"])
  batch = next(iter(data.eval_batches(data.get_source("digits", "test"), 8,
                                      (8, 8))))
  batch = {"image": batch["image"], "label": batch["label"]}
  logits, _ = model.apply({"params": params}, batch["image"], train=False)
  logits = np.asarray(logits, np.float64)
  assert logits.std() > 0.5 and len(set(batch["label"].tolist())) > 4
  return model, params, batch, logits


def _task_loss(model, params, batch, loss, smoothing):
  task = tasks.create(_task_config(loss, smoothing),
                      data.get_source("digits", "train"))
  assert task.num_classes == 10
  rngs = {"dropout": jax.random.PRNGKey(1), "step": jax.random.PRNGKey(2)}
  value, aux = task.loss(model, params, batch, rngs)
  assert aux == {}
  return float(value)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_classification_softmax_loss_with_label_smoothing_by_hand(
    model_batch_logits, smoothing):
  model, params, batch, logits = model_batch_logits
  k = 10
  # Smoothed targets: 1 - s + s / K on the label, s / K elsewhere.
  targets = np.full((8, k), smoothing / k)
  targets[np.arange(8), batch["label"]] += 1 - smoothing
  want = -(targets * _log_softmax(logits)).sum(-1).mean()
  np.testing.assert_allclose(
      _task_loss(model, params, batch, "softmax_xent", smoothing), want,
      rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_classification_sigmoid_loss_by_hand(model_batch_logits, smoothing):
  model, params, batch, logits = model_batch_logits
  k = 10
  targets = np.full((8, k), smoothing / k)
  targets[np.arange(8), batch["label"]] += 1 - smoothing
  p = 1 / (1 + np.exp(-logits))
  # Per-class binary cross-entropy, summed over the 10 classes.
  want = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1).mean()
  np.testing.assert_allclose(
      _task_loss(model, params, batch, "sigmoid_xent", smoothing), want,
      rtol=1e-5)


def test_sigmoid_xent_through_the_training_loop(tmp_path):
  """--config.loss=sigmoid_xent reaches the loss: with the zero-initialised
  head every logit of step 1 is 0, so the loss is 10 log 2 (softmax: log 10)."""
  config = tiny_config(loss="sigmoid_xent", total_steps=1,
                       mesh=(("data", 1), ("model", 1)))
  config.optim.warmup_steps = 0
  config.evals.eval.every = -1
  train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  rows = [r for r in metrics.read_jsonl(str(tmp_path)) if "train/loss" in r]
  assert len(rows) == 1
  np.testing.assert_allclose(rows[0]["train/loss"], 10 * np.log(2), rtol=1e-5)


def test_mse_regression_head_shape():
  pred = np.array([[1.], [2.], [4.]], np.float32)
  target = np.array([0., 2., 1.], np.float32)
  np.testing.assert_allclose(losses.mse(pred, target), (1 + 0 + 9) / 3)
  np.testing.assert_allclose(losses.mse(pred, target, reduction=False),
                             [1, 0, 9])
  with pytest.raises(ValueError, match="different shapes"):
    losses.mse(np.zeros((3, 2)), target)


def _masked_l1_by_hand(pixels, recon, mask, ph, pw):
  b, h, w, c = pixels.shape
  gw = w // pw
  total, count = 0., 0.
  for i in range(b):
    for y in range(h):
      for x in range(w):
        if mask[i, (y // ph) * gw + x // pw]:
          total += np.abs(pixels[i, y, x] - recon[i, y, x]).sum()
          count += 1
  return total / (count + 1e-5) / c


@pytest.mark.parametrize("patch", [4, (4, 2)])
def test_masked_l1_by_hand(patch):
  rng = np.random.default_rng(0)
  ph, pw = (patch, patch) if isinstance(patch, int) else patch
  pixels = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  recon = rng.normal(size=pixels.shape).astype(np.float32)
  mask = rng.random((2, (8 // ph) * (12 // pw))) < 0.5
  got = losses.masked_l1(pixels, recon, mask, patch)
  np.testing.assert_allclose(
      got, _masked_l1_by_hand(pixels, recon, mask, ph, pw), rtol=1e-5)


def test_masked_l1_matches_hugging_face_formula():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  p, size, c = 4, 8, 3
  pixels = rng.normal(size=(2, size, size, c)).astype(np.float32)
  recon = rng.normal(size=pixels.shape).astype(np.float32)
  mask = rng.random((2, (size // p)**2)) < 0.5
  # ViTForMaskedImageModeling.forward, on NCHW tensors.
  pv = torch.from_numpy(pixels).permute(0, 3, 1, 2)
  rv = torch.from_numpy(recon).permute(0, 3, 1, 2)
  m = torch.from_numpy(mask).reshape(-1, size // p, size // p)
  m = m.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)
  m = m.contiguous()
  loss = torch.nn.functional.l1_loss(pv, rv, reduction="none")
  expected = ((loss * m).sum() / (m.sum() + 1e-5) / c).item()
  np.testing.assert_allclose(losses.masked_l1(pixels, recon, mask, p),
                             expected, rtol=1e-5)


def test_masked_l1_errors():
  x = np.zeros((1, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"bool_masked_pos must have shape"):
    losses.masked_l1(x, x, np.zeros((1, 3), bool), 4)
  with pytest.raises(ValueError, match=r"not divisible by patch size"):
    losses.masked_l1(x, x, np.zeros((1, 4), bool), 3)


def test_random_mask_counts():
  mask = masking.random_mask(jax.random.PRNGKey(0), 5, 16, 0.4)
  mask = np.asarray(mask)
  assert mask.shape == (5, 16) and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(axis=1), 6)  # round(6.4)
  assert len({row.tobytes() for row in mask}) > 1  # Differs per example.


def test_block_mask_cells():
  masks = np.asarray(
      masking.block_mask(0, 3, (4, 6), ratio=0.5, mask_patch_size=2))
  assert masks.shape == (3, 24) and masks.dtype == bool
  grid = masks.reshape(3, 4, 6)
  cells = grid.reshape(3, 2, 2, 3, 2).transpose(0, 1, 3, 2, 4).reshape(3, 6, 4)
  # Each 2x2 cell of patches is all masked or all visible.
  assert np.all(cells.all(-1) | ~cells.any(-1))
  np.testing.assert_array_equal(cells.all(-1).sum(-1), 3)  # 0.5 * 6
  np.testing.assert_array_equal(
      masking.block_mask(0, 3, (4, 6), 0.5, 2), masks)  # Seeded.


def test_mask_count_rounds_to_nearest():
  assert masking.num_masked(4, 0.6) == 2  # Not 3 (75%), as rounding up gives.
  assert masking.num_masked(49, 0.6) == 29
  assert masking.num_masked(10, 0.25) == 3  # Halves round up.
  masks = np.asarray(masking.block_mask(1, 8, (2, 2), 0.6))
  np.testing.assert_array_equal(masks.sum(-1), 2)


def test_example_masks_depend_on_index_only():
  rng = jax.random.PRNGKey(3)
  all_rows = np.asarray(masking.example_masks(rng, np.arange(6), (4, 4), 0.5, 2))
  some = np.asarray(masking.example_masks(rng, np.array([4, 1]), (4, 4), 0.5, 2))
  np.testing.assert_array_equal(some, all_rows[[4, 1]])
  assert len({row.tobytes() for row in all_rows}) > 1


def test_mask_errors():
  with pytest.raises(ValueError, match=r"grid \(4, 6\) is not divisible"):
    masking.block_mask(0, 1, (4, 6), mask_patch_size=4)
  with pytest.raises(ValueError, match="ratio must be in"):
    masking.random_mask(jax.random.PRNGKey(0), 1, 4, 1.5)
