"""The official `vision_transformer` ViT, as a benchmark peer under JAX.

google-research/vision_transformer (`vit_jax/models_vit.py`) builds the ViT
from flax's stock modules: `nn.Conv` patch embedding, `nn.LayerNorm`,
`nn.MultiHeadDotProductAttention` and an MLP of `nn.Dense` layers applied to
[B, T, D] activations. `ReferenceViT` is that architecture (non-hybrid,
learned 1-D position embedding, "token" or "gap" pooling, tanh-approximate
GELU, no dropout: the throughput benchmark trains without it) with the same
parameter tree as `vit_jax.models.VisionTransformer`, so the two take the
same parameters and compute the same function (tests/test_bench_throughput.py
checks it): what the benchmark compares is the implementation alone.
"""

import flax.linen as nn
import jax.numpy as jnp


class _MlpBlock(nn.Module):
  mlp_dim: int
  dtype: str

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
              bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x))
    return nn.Dense(x.shape[-1], name="Dense_1", **kw)(y)


class _EncoderBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dtype: str

  @nn.compact
  def __call__(self, inputs):
    x = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_0")(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        name="MultiHeadDotProductAttention_1")(x, x)
    x = x + inputs
    y = nn.LayerNorm(dtype=self.dtype, name="LayerNorm_2")(x)
    return x + _MlpBlock(self.mlp_dim, self.dtype, name="MlpBlock_3")(y)


class _AddPositionEmbs(nn.Module):

  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                    (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


class _Encoder(nn.Module):
  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: str

  @nn.compact
  def __call__(self, x):
    x = _AddPositionEmbs(name="posembed_input")(x)
    for i in range(self.num_layers):
      x = _EncoderBlock(self.mlp_dim, self.num_heads, self.dtype,
                        name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)


class ReferenceViT(nn.Module):
  """`models_vit.VisionTransformer` of the official code (see module doc)."""
  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = "token"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.hidden_size, (self.patch_size,) * 2,
                strides=(self.patch_size,) * 2, padding="VALID",
                dtype=self.dtype, name="embedding")(images.astype(self.dtype))
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], 1)
    x = _Encoder(self.num_layers, self.mlp_dim, self.num_heads, self.dtype,
                 name="Transformer")(x)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.initializers.zeros)(x).astype(jnp.float32)


def from_fields(cfg, dtype: str = "float32") -> ReferenceViT:
  """The reference model of our model fields `cfg` (a dict).

  Raises:
    ValueError: for fields it cannot express (hybrid, other position
      embeddings or pooling, non-square patches, another activation, ...).
  """
  expected = dict(resnet=None, posemb="learn", hidden_act="gelu_tanh",
                  representation_size=None, qkv_bias=True, qk_scale=None,
                  layer_norm_eps=1e-6)
  for key, value in expected.items():
    if cfg.get(key, value) != value:
      raise ValueError(f"the official model has no {key}={cfg[key]!r}")
  if cfg.get("classifier", "token") not in ("token", "gap"):
    raise ValueError(f"the official model has no classifier="
                     f"{cfg['classifier']!r}")
  if not isinstance(cfg["patch_size"], int):
    raise ValueError("the official model has square patches only")
  return ReferenceViT(
      num_classes=cfg["num_classes"], patch_size=cfg["patch_size"],
      hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
      num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"],
      classifier=cfg.get("classifier", "token"), dtype=dtype)
