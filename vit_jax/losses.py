"""Losses: softmax / sigmoid cross-entropy, MSE regression, masked L1 (SimMIM).

All take arrays of any leading shape and return the mean over examples, or
per-example values with `reduction=False`.
"""

import jax
import jax.numpy as jnp

from vit_jax.sizes import pair


def softmax_xent(logits, labels_onehot, reduction: bool = True):
  """Cross-entropy of softmax(logits) against (soft) one-hot labels."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.sum(labels_onehot * log_p, axis=-1)
  return jnp.mean(nll) if reduction else nll


def sigmoid_xent(logits, labels, reduction: bool = True):
  """Per-class binary cross-entropy, summed over classes."""
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  nll = -jnp.sum(labels * log_p + (1. - labels) * log_not_p, axis=-1)
  return jnp.mean(nll) if reduction else nll


def mse(predictions, targets, reduction: bool = True):
  """Mean squared error; a regression head's [B, 1] matches targets [B]."""
  predictions = predictions.astype(jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if predictions.ndim == targets.ndim + 1 and predictions.shape[-1] == 1:
    predictions = predictions[..., 0]
  if predictions.shape != targets.shape:
    raise ValueError(f"predictions {predictions.shape} and targets "
                     f"{targets.shape} have different shapes")
  err = jnp.square(predictions - targets)
  err = err.reshape(err.shape[0], -1).mean(axis=-1) if err.ndim > 1 else err
  return jnp.mean(err) if reduction else err


def upsample_mask(bool_masked_pos, grid, patch_size):
  """[B, h * w] patch mask -> [B, h * ph, w * pw] pixel mask (float32)."""
  ph, pw = pair(patch_size, "patch_size")
  h, w = grid
  mask = jnp.asarray(bool_masked_pos).reshape(-1, h, w).astype(jnp.float32)
  return jnp.repeat(jnp.repeat(mask, ph, axis=1), pw, axis=2)


def masked_l1(pixels, reconstruction, bool_masked_pos, patch_size):
  """Hugging Face ViTForMaskedImageModeling's loss.

  sum(|pixels - reconstruction| * mask) / (sum(mask) + 1e-5) / C, with the
  [B, num_patches] mask upsampled to pixels; images are [B, H, W, C].
  """
  ph, pw = pair(patch_size, "patch_size")
  b, height, width, channels = pixels.shape
  if reconstruction.shape != pixels.shape:
    raise ValueError(f"reconstruction {reconstruction.shape} and pixels "
                     f"{pixels.shape} have different shapes")
  if height % ph or width % pw:
    raise ValueError(f"image size {(height, width)} is not divisible by "
                     f"patch size {(ph, pw)}")
  grid = (height // ph, width // pw)
  if tuple(bool_masked_pos.shape) != (b, grid[0] * grid[1]):
    raise ValueError(f"bool_masked_pos must have shape [batch, num_patches] = "
                     f"{(b, grid[0] * grid[1])}, got {bool_masked_pos.shape}")
  mask = upsample_mask(bool_masked_pos, grid, (ph, pw))[..., None]
  loss = jnp.abs(pixels.astype(jnp.float32) -
                 reconstruction.astype(jnp.float32))
  return jnp.sum(loss * mask) / (jnp.sum(mask) + 1e-5) / channels
