"""Field checks shared by the model families (ValueError naming the field)."""

import jax.numpy as jnp


def check_dtypes(module, fields=("dtype", "param_dtype")):
  """Raises ValueError unless each of `module`'s `fields` names a dtype."""
  for field in fields:
    try:
      jnp.dtype(getattr(module, field))
    except TypeError as e:
      raise ValueError(f"{field} {getattr(module, field)!r} is not a dtype, "
                       "use e.g. 'float32' or 'bfloat16'") from e


def check_images(images, num_channels):
  """Raises ValueError unless `images` is [batch, h, w, num_channels]."""
  if images.ndim != 4:
    raise ValueError(f"images must be [batch, height, width, channels], got "
                     f"shape {images.shape}")
  if images.shape[-1] != num_channels:
    raise ValueError(f"images have {images.shape[-1]} channels but the "
                     f"model has num_channels={num_channels}: set "
                     "num_channels to the images' channel count")
