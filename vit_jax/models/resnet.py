"""BiT ResNet stem for the hybrid ViT (ResNet feature map -> patch embedding).

Weight-standardized convolutions (`StdConv`) and GroupNorm with 32 groups,
bottleneck units with the projection on the residual path. Module names
(`conv_root`, `gn_root`, `block{j}/unit{k}/{conv1,gn1,...,conv_proj,gn_proj}`)
reproduce the published R50+ViT checkpoints; `stem` creates them directly in
the calling module so that they sit at the top of the parameter tree.
"""

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w, axis, eps):
  """Subtracts the mean and divides by the standard deviation over `axis`."""
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """Convolution with a weight-standardized kernel."""

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == "kernel":
      param = weight_standardize(param, axis=(0, 1, 2), eps=1e-5)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1, 3x3 (strided), 1x1 with 4x the features."""
  features: int
  strides: Tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: StdConv(  # pylint: disable=g-long-lambda
        features=f, kernel_size=k, strides=s, use_bias=False, name=name,
        dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name, **kw: nn.GroupNorm(  # pylint: disable=g-long-lambda
        name=name, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    needs_projection = (x.shape[-1] != self.features * 4 or
                        tuple(self.strides) != (1, 1))
    residual = x
    if needs_projection:
      residual = conv(self.features * 4, (1, 1), self.strides, "conv_proj")(x)
      residual = norm("gn_proj")(residual)
    y = conv(self.features, (1, 1), (1, 1), "conv1")(x)
    y = nn.relu(norm("gn1")(y))
    y = conv(self.features, (3, 3), self.strides, "conv2")(y)
    y = nn.relu(norm("gn2")(y))
    y = conv(self.features * 4, (1, 1), (1, 1), "conv3")(y)
    y = norm("gn3", scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """A stage of `block_size` units; the first one may downsample."""
  block_size: int
  nout: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ResidualUnit(self.nout, strides=self.first_stride, name="unit1",
                     **kw)(x)
    for i in range(1, self.block_size):
      x = ResidualUnit(self.nout, strides=(1, 1), name=f"unit{i + 1}", **kw)(x)
    return x


def stride(num_layers: Sequence[int]) -> int:
  """Downsampling factor of the stem: 4 for the root, 2 per extra stage."""
  return 4 * 2**max(len(num_layers) - 1, 0)


def stem(x, num_layers: Sequence[int], width_factor: float = 1,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
  """Applies the root block and the stages; call inside a compact method."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  width = int(64 * width_factor)
  x = StdConv(features=width, kernel_size=(7, 7), strides=(2, 2),
              use_bias=False, name="conv_root", **kw)(x)
  x = nn.relu(nn.GroupNorm(name="gn_root", **kw)(x))
  x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
  if num_layers:
    x = ResNetStage(block_size=num_layers[0], nout=width, first_stride=(1, 1),
                    name="block1", **kw)(x)
    for i, block_size in enumerate(num_layers[1:], 1):
      x = ResNetStage(block_size=block_size, nout=width * 2**i,
                      first_stride=(2, 2), name=f"block{i + 1}", **kw)(x)
  return x
