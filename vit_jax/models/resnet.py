"""BiT ResNets: the stem of the hybrid ViT, and the BiT classifier family.

Both use weight-standardized convolutions and GroupNorm; each keeps the numerics
of the checkpoints it must load.

- The hybrid stem (`stem`): post-activation bottleneck units with the
  projection on the residual path. Module names (`conv_root`, `gn_root`,
  `block{j}/unit{k}/{conv1,gn1,...,conv_proj,gn_proj}`) reproduce the published
  R50+ViT checkpoints; `stem` creates them directly in the calling module so
  that they sit at the top of the parameter tree.
- `BiT`, the ResNet-v2 of "Big Transfer" (Kolesnikov et al.): pre-activation
  bottleneck units, numerically identical to timm's `ResNetV2` as built by
  `timm.create_model("resnetv2_50x1_bit")` (docs/design.md §5, "BiT ResNets").
  Module names follow big_vision's `bit.py`: `conv_root`,
  `block{i}/unit{jj}/{gn1,conv1,gn2,conv2,gn3,conv3,conv_proj}`,
  `norm-pre-head`, `head`.
"""

import math
from typing import Any, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import checks
from vit_jax.sizes import IntOrPair
from vit_jax.sizes import pair

Dtype = Any


def weight_standardize(w, axis, eps):
  """Subtracts the mean and divides by the standard deviation over `axis`."""
  w = w - jnp.mean(w, axis=axis, keepdims=True)
  return w / (jnp.std(w, axis=axis, keepdims=True) + eps)


def weight_standardize_var(w, axis, eps):
  """timm's StdConv2d: `(w - mean) / sqrt(var + eps)`, biased variance."""
  mean = jnp.mean(w, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(w - mean), axis=axis, keepdims=True)
  return (w - mean) * jax.lax.rsqrt(var + eps)


class StdConv(nn.Conv):
  """Convolution with a weight-standardized kernel (the hybrid's formula)."""

  def standardize(self, kernel):
    return weight_standardize(kernel, axis=(0, 1, 2), eps=1e-5)

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == "kernel":
      param = self.standardize(param)
    return param


class StdConvBiT(StdConv):
  """StdConv with timm's formula and eps (BiT: `StdConv2d(eps=1e-8)`)."""
  eps: float = 1e-8

  def standardize(self, kernel):
    return weight_standardize_var(kernel, axis=(0, 1, 2), eps=self.eps)


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


# The BiT classifier family (ResNet-v2).

DEFAULT_NUM_LAYERS = (3, 4, 6, 3)  # BiT-R50.
RESNET_KEYS = ("num_layers", "width_factor")


def make_divisible(value, divisor: int = 8) -> int:
  """timm's channel rounding: the nearest multiple of `divisor` (at least one
  `divisor`), raised by one `divisor` if that falls below 90% of `value`."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def num_groups(channels: int) -> int:
  """GroupNorm groups of a BiT layer: timm's 32 whenever 32 divides the
  channels (every layer at width_factor >= 1), else gcd(channels, 32), the
  largest power of two up to 32 that divides them (e.g. 16 for 16 or 48)."""
  return math.gcd(int(channels), 32)


def bit_widths(num_layers: Sequence[int], width_factor: float):
  """(root width, ((mid, out) per stage)) as timm's ResNetV2 rounds them:
  stage i has `make_divisible(256 * 2**i * width_factor)` output channels and
  a quarter of that (rounded) in its bottleneck."""
  root = make_divisible(64 * width_factor)
  stages = []
  for i in range(len(num_layers)):
    out = make_divisible(256 * 2**i * width_factor)
    stages.append((make_divisible(out * 0.25), out))
  return root, tuple(stages)


def _group_norm(channels, name, dtype, param_dtype):
  """timm's GroupNormAct norm (eps 1e-5, two-pass variance); ReLU is apart."""
  return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-5,
                      use_fast_variance=False, name=name, dtype=dtype,
                      param_dtype=param_dtype)


def _bit_conv(features, kernel, strides, padding, name, dtype, param_dtype):
  """StdConvBiT without bias, symmetric padding and timm's fan-out init."""
  return StdConvBiT(
      features=features, kernel_size=(kernel, kernel), strides=strides,
      padding=((padding, padding), (padding, padding)), use_bias=False,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      name=name, dtype=dtype, param_dtype=param_dtype)


class PreActUnit(nn.Module):
  """Pre-activation bottleneck (timm's PreActBottleneck).

  GN-ReLU, 1x1; GN-ReLU, 3x3 (carries the stride); GN-ReLU, 1x1 to `out`
  channels; plus the shortcut: the input itself, or with `project` a strided
  1x1 convolution of the pre-activated input (no norm).
  """
  mid: int
  out: int
  strides: Tuple[int, int] = (1, 1)
  project: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    preact = nn.relu(_group_norm(x.shape[-1], "gn1", **kw)(x))
    shortcut = x
    if self.project:
      shortcut = _bit_conv(self.out, 1, self.strides, 0, "conv_proj",
                           **kw)(preact)
    y = _bit_conv(self.mid, 1, (1, 1), 0, "conv1", **kw)(preact)
    y = nn.relu(_group_norm(self.mid, "gn2", **kw)(y))
    y = _bit_conv(self.mid, 3, self.strides, 1, "conv2", **kw)(y)
    y = nn.relu(_group_norm(self.mid, "gn3", **kw)(y))
    y = _bit_conv(self.out, 1, (1, 1), 0, "conv3", **kw)(y)
    return y + shortcut


class PreActStage(nn.Module):
  """`block_size` units `unit01`, `unit02`, ...; the first one projects."""
  block_size: int
  mid: int
  out: int
  first_stride: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.block_size):
      x = PreActUnit(self.mid, self.out,
                     strides=self.first_stride if j == 0 else (1, 1),
                     project=j == 0, name=f"unit{j + 1:02d}", **kw)(x)
    return x


def _check_resnet(resnet):
  """ValueError unless `resnet` is dict(num_layers=..., width_factor=...)."""
  unknown = sorted(set(resnet) - set(RESNET_KEYS))
  if unknown:
    raise ValueError(f"unknown resnet fields {unknown}: use num_layers and "
                     "width_factor")
  layers = resnet["num_layers"]
  if (not isinstance(layers, tuple) or not layers or any(
      isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1
      for n in layers)):
    raise ValueError(f"resnet num_layers {layers!r} must be a non-empty "
                     "sequence of positive unit counts per stage, e.g. "
                     "(3, 4, 6, 3)")
  width = resnet["width_factor"]
  if (isinstance(width, bool) or not isinstance(width, (int, float, np.number))
      or not math.isfinite(width) or width <= 0):
    raise ValueError(f"resnet width_factor {width!r} must be a positive "
                     "number, e.g. 1 or 0.25")


class BiT(nn.Module):
  """BiT ResNet-v2 classifier (Big Transfer), as timm's ResNetV2 BiT models.

  Root: 7x7 stride-2 StdConv (symmetric padding 3), zero padding of 1 and a
  3x3 stride-2 max pool. Stages of pre-activation bottleneck units (stride 2
  on the 3x3 convolution of each stage's first unit but the first stage's),
  then GroupNorm + ReLU (`norm-pre-head`), global average pooling and a
  Dense head (timm's 1x1 convolution on the pooled features). Convolutions
  standardize their kernels as timm's `StdConv2d(eps=1e-8)`; GroupNorm has
  eps 1e-5 and 32 groups (see `num_groups` for narrow fractional widths).

  `__call__` returns `(output, out)` as VisionTransformer does: output is the
  float32 logits, or the pooled features without a head; `out` holds "stem"
  (after the max pool), "stage{i}", "pre_logits" and "patch_mean" (both the
  pooled features after the final norm and ReLU) and "logits".

  Attributes:
    num_classes: head outputs; 0 for no head.
    image_size: int or (h, w) of the training images (any size runs).
    num_channels: image channels.
    resnet: dict(num_layers=units per stage, width_factor=channel multiplier,
      fractional allowed); missing keys take BiT-R50x1's (3, 4, 6, 3) and 1.
    dtype, param_dtype: compute and parameter dtypes.
  """
  num_classes: int = 1000
  image_size: IntOrPair = 224
  num_channels: int = 3
  resnet: Optional[Any] = None
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    # Sequences and the resnet dict become tuples / FrozenDict: the module
    # stays hashable (usable as a static argument) and equal across configs.
    if not isinstance(self.image_size, (int, np.integer)):
      object.__setattr__(self, "image_size",
                         tuple(int(v) for v in self.image_size))
    resnet = self.resnet if self.resnet is not None else {}
    if not hasattr(resnet, "keys"):
      raise ValueError(f"resnet must be a dict(num_layers=..., width_factor="
                       f"...), got {resnet!r}")
    resnet = dict(dict(num_layers=DEFAULT_NUM_LAYERS, width_factor=1),
                  **dict(resnet))
    if isinstance(resnet["num_layers"], (list, tuple)):
      resnet["num_layers"] = tuple(resnet["num_layers"])
    object.__setattr__(self, "resnet", flax.core.FrozenDict(resnet))
    super().__post_init__()
    self.check()

  def check(self):
    """Raises ValueError for inconsistent fields."""
    _check_resnet(dict(self.resnet))
    for field in ("num_classes", "num_channels"):
      value = getattr(self, field)
      low = 0 if field == "num_classes" else 1
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or value < low):
        raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
    checks.check_dtypes(self)
    pair(self.image_size, "image_size")

  @property
  def widths(self):
    """(root width, ((mid, out) per stage)); see `bit_widths`."""
    return bit_widths(self.resnet["num_layers"], self.resnet["width_factor"])

  @property
  def hidden_size(self) -> int:
    """Width of the pooled features (pre_logits)."""
    return self.widths[1][-1][1]

  @property
  def encoder_stride(self) -> Tuple[int, int]:
    """Downsampling of the last feature map: 4, then 2 per further stage."""
    s = stride(self.resnet["num_layers"])
    return (s, s)

  def grid_size(self, image_size: IntOrPair) -> Tuple[int, int]:
    """(h, w) of the last feature map; any image size works (ceil)."""
    h, w = pair(image_size, "image_size")
    sh, sw = self.encoder_stride
    return (-(-h // sh), -(-w // sw))

  @nn.compact
  def __call__(self, images, train: bool = False, *,
               interpolate_pos_encoding: bool = False,
               output_hidden_states: bool = False,
               output_attentions: bool = False):
    """`train`, `interpolate_pos_encoding` and `output_hidden_states` change
    nothing (no dropout, no position embeddings; every stage is in `out`)."""
    del train, interpolate_pos_encoding, output_hidden_states
    if output_attentions:
      raise ValueError("a BiT ResNet has no attention weights: "
                       "output_attentions needs a VisionTransformer")
    dtype = jnp.dtype(self.dtype)
    kw = dict(dtype=dtype, param_dtype=jnp.dtype(self.param_dtype))
    checks.check_images(images, self.num_channels)
    root, stages = self.widths
    out = {}
    x = _bit_conv(root, 7, (2, 2), 3, "conv_root", **kw)(images.astype(dtype))
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = out["stem"] = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    for i, (block_size, (mid, width)) in enumerate(
        zip(self.resnet["num_layers"], stages)):
      x = out[f"stage{i + 1}"] = PreActStage(
          block_size=block_size, mid=mid, out=width,
          first_stride=(2, 2) if i else (1, 1), name=f"block{i + 1}", **kw)(x)
    x = nn.relu(_group_norm(x.shape[-1], "norm-pre-head", **kw)(x))
    x = out["pre_logits"] = out["patch_mean"] = jnp.mean(x, axis=(1, 2))
    output = x
    if self.num_classes:
      logits = nn.Dense(self.num_classes, name="head",
                        kernel_init=nn.initializers.zeros, **kw)(x)
      output = out["logits"] = logits.astype(jnp.float32)
    return output, out
