"""SimMIM masked image modeling (Xie et al. 2022; as HF's
`ViTForMaskedImageModeling`).

Patches under a random block mask are replaced by the learned `mask_token`;
the encoder's patch tokens go through the decoder (1x1 conv + pixel shuffle)
back to pixels, and the loss is the L1 error on the masked pixels only
(`losses.masked_l1`, Hugging Face's formula).

Config block `simmim`: `mask_ratio` (0.6), `mask_unit` (side of a mask cell
in pixels, 32 on 16 px patches in SimMIM; a multiple of the patch size that
divides the image). Masks come from `fold_in(fold_in(step_key, 1), index)`:
reproducible from (seed, step) and independent of devices and processes.
"""

import jax

from vit_jax import errors
from vit_jax import losses
from vit_jax import masking

MASK_STREAM = 1  # fold_in(step key, MASK_STREAM): the masks' key.


def mask_settings(config):
  """(ratio, unit in pixels) of `config.simmim`, with SimMIM's defaults."""
  cfg = config.get("simmim") or {}
  return float(cfg.get("mask_ratio", 0.6)), int(cfg.get("mask_unit", 32))


def mask_patch_size(model, mask_unit):
  """Mask cell side in patches; Error unless the unit is a patch multiple."""
  stride = model.encoder_stride
  if stride[0] != stride[1] or mask_unit % stride[0]:
    raise errors.Error(
        f"simmim.mask_unit={mask_unit} px is not a multiple of the patch "
        f"size {stride}: set --config.simmim.mask_unit to a multiple of it")
  return mask_unit // stride[0]


def masks(model, step_rng, indices, image_size, ratio, mask_unit):
  """The masks of examples `indices` of the step whose key is `step_rng`."""
  grid = model.grid_size(image_size)
  return masking.example_masks(
      jax.random.fold_in(step_rng, MASK_STREAM), indices, grid, ratio,
      mask_patch_size(model, mask_unit))


class Task:
  """Reconstruct masked patches; masked L1 loss."""

  output = "reconstruction"

  def __init__(self, config, source):
    del source
    self.ratio, self.mask_unit = mask_settings(config)
    masking.num_masked(1, self.ratio)  # Validates the ratio.
    self.model_fields = dict(decoder=True, num_classes=0)
    self.default_evals = {"reconstruction": dict(
        type="reconstruction", every=500, mask_ratio=self.ratio,
        mask_unit=self.mask_unit)}

  def check(self, model, image_size):
    """Errors for a mask unit that does not fit the model and images."""
    try:
      masking.cell_grid(model.grid_size(image_size),
                        mask_patch_size(model, self.mask_unit))
    except ValueError as e:
      raise errors.Error(f"{e} (--config.simmim.mask_unit, "
                         "--config.image_size)") from None

  def loss(self, model, params, batch, rngs):
    images = batch["image"]
    mask = masks(model, rngs["step"], batch["index"], images.shape[1:3],
                 self.ratio, self.mask_unit)
    reconstruction, _ = model.apply(
        {"params": params}, images, train=True, bool_masked_pos=mask,
        rngs={"dropout": rngs["dropout"]})
    loss = losses.masked_l1(images, reconstruction, mask, model.encoder_stride)
    return loss, {}
