"""Vision Transformer: patch embedding, tokens, position embeddings, pre-LN
encoder, pooling and heads.

Module names reproduce the parameter tree of the published ViT checkpoints
(docs/design.md §3): `embedding`, `cls`, `Transformer/posembed_input`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}`, `Transformer/encoder_norm`, `pre_logits`, `head`.
Additions sit beside them: `mask_token`, `MAPHead_0`, `decoder` and the
hybrid ResNet stem (`conv_root`, `gn_root`, `block{j}/unit{k}`);
with posemb="relative", each block's attention holds
`relative_position_bias` instead of `Transformer/posembed_input`.

`VisionTransformer.__call__` returns `(output, out)`, `out` a dict of named
intermediates: "stem", "encoded", "patch_mean" (the mean of the encoded
patch tokens, without the cls token), "pre_logits", "logits", and on request
"embeddings", "block{i}" and "block{i}/attention"; "reconstruction" with a
decoder.
"""

import functools
from typing import Any, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import posemb as posemb_lib
from vit_jax.models import checks
from vit_jax.models import resnet as resnet_lib
from vit_jax.sizes import IntOrPair
from vit_jax.sizes import pair

Dtype = Any

CLASSIFIERS = ("token", "gap", "map", "unpooled")
POSEMBS = ("learn", "learn2d", "sincos2d", "sincos1d", "none", "relative")
ACTIVATIONS = ("gelu_tanh", "gelu")
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


def per_token(layer, x, in_dims: int = 1):
  """`layer` applied to the last `in_dims` axes of `x` as one 2-D matmul.

  The leading (batch, token) axes are merged before the layer and split
  after it, so the kernel's gradient contracts one axis: XLA on CPU runs a
  Dense on [B, T, D] inputs (two contracted axes in the backward pass)
  several times slower than on [B * T, D] (docs/benchmarks.md, profile).
  """
  lead = x.shape[:x.ndim - in_dims]
  y = layer(x.reshape((-1,) + x.shape[x.ndim - in_dims:]))
  return y.reshape(lead + y.shape[1:])


def attention_impl(impl: str, need_weights: bool) -> str:
  """The attention kernel for `impl` ("auto" resolved per backend).

  "einsum": our [B, H, T, T] path (weights available; the fastest on CPU);
  "xla" / "cudnn": `jax.nn.dot_product_attention` with that implementation;
  "jax": `jax.nn.dot_product_attention` choosing its own implementation
  (cuDNN's fused kernel where it supports the call, else XLA's). "auto" is
  "einsum" on CPU or when the weights are needed, else "jax".
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}: use one of "
                     f"{ATTENTION_IMPLS}")
  if need_weights:
    if impl in ("xla", "cudnn"):
      raise ValueError(f"attention_impl={impl!r} cannot return or modify the "
                       "attention weights (output_attentions, head_mask, "
                       "attention dropout): use 'auto' or 'einsum'")
    return "einsum"
  if impl != "auto":
    return impl
  return "einsum" if jax.default_backend() == "cpu" else "jax"


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention_core(q, k, v, bias, scale: float):
  """softmax(scale · q kᵀ + bias) v on heads-first [B, H, T, D/H] arrays.

  The logits are in q's dtype, the softmax in float32, its result (the
  weights P) cast back to q's dtype; `bias` (None or [1, H, T, T]) is added
  to the logits. Its gradient is written out (flash attention's backward
  pass, with the whole P kept): the forward pass saves q, k, v, P and the
  output O, not the logits or the exponentials, and the backward pass is

    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − rowsum(dO ⊙ O)),
    dQ = scale · dS K,  dK = scale · dSᵀ Q,  d bias = Σ_batch dS,

  where rowsum(dO ⊙ O) = rowsum(dP ⊙ P) (since O = PV) reduces over D/H
  instead of T. The same function as the plain einsum / softmax path
  (to float32 round-off), used where that path would not need the weights.
  """
  return _attention_core_fwd(q, k, v, bias, scale)[0]


def _attention_logits(q, k, bias, scale):
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  return logits if bias is None else logits + bias


def _attention_core_fwd(q, k, v, bias, scale):
  weights = jax.nn.softmax(
      _attention_logits(q, k, bias, scale).astype(jnp.float32), axis=-1)
  weights = weights.astype(q.dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
  return out, (q, k, v, bias, weights, out)


def _attention_core_bwd(scale, res, d_out):
  q, k, v, bias, weights, out = res
  d_v = jnp.einsum("bhqk,bhqd->bhkd", weights, d_out)
  d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v).astype(jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1,
                keepdims=True)  # = rowsum(dP ⊙ P)
  d_logits = weights.astype(jnp.float32) * (d_weights - row)
  d_bias = None
  if bias is not None:
    axes = tuple(i for i, (n, m) in enumerate(zip(bias.shape, d_logits.shape))
                 if n == 1 and m != 1)
    d_bias = jnp.sum(d_logits, axis=axes, keepdims=True).astype(bias.dtype)
  d_logits = d_logits.astype(q.dtype)
  scale = jnp.asarray(scale, q.dtype)
  d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k) * scale
  d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q * scale)
  return d_q, d_k, d_v, d_bias


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def activation(name: str):
  if name == "gelu_tanh":
    return lambda x: nn.gelu(x, approximate=True)
  if name == "gelu":
    return lambda x: nn.gelu(x, approximate=False)
  raise ValueError(f"unknown hidden_act {name!r}: use one of {ACTIVATIONS}")


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.
  hidden_act: str = "gelu_tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dense = lambda features, name: nn.Dense(  # pylint: disable=g-long-lambda
        features, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # one [tokens, D] matmul (see per_token)
    x = dense(self.mlp_dim, "Dense_0")(x)
    x = activation(self.hidden_act)(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = dense(shape[-1], "Dense_1")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    return x.reshape(shape)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the parameter layout of flax's module.

  query/key/value kernels are (D, H, D/H), biases (H, D/H); the output
  kernel is (H, D/H, D). Every projection runs as one [tokens, D] matmul
  (`per_token`). `impl` picks the attention kernel (`attention_impl`): the
  explicit [B, H, T, T] einsum / softmax path (also whenever the weights are
  needed: returned, multiplied by a head mask or dropped out) or
  `jax.nn.dot_product_attention` ("xla", "cudnn"). Where the einsum path
  does not need the weights it is `attention_core`, with its hand-written
  backward pass (faster on CPU, docs/benchmarks.md).

  With `relative_grid` (the patch grid the table is built for), a learned
  relative position bias is added to the logits before the softmax:
  `relative_position_bias` [(2h - 1) * (2w - 1) + extra, H] (BEiT's layout,
  `extra` = 3 with a cls token, zeros at init), gathered with
  `posemb.relative_position_index` of the tokens' `grid` and resampled
  bilinearly when that grid differs.
  """
  num_heads: int
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  dropout_rate: float = 0.
  relative_grid: Optional[Tuple[int, int]] = None
  num_prefix_tokens: int = 0
  impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _relative_bias(self, grid, num_tokens):
    """The bias [1, H, T, T] of the tokens' grid, from this block's table."""
    size = posemb_lib.relative_table_size(self.relative_grid,
                                          self.num_prefix_tokens)
    table = self.param("relative_position_bias", nn.initializers.zeros,
                       (size, self.num_heads), self.param_dtype)
    grid = tuple(self.relative_grid if grid is None else grid)
    if num_tokens != self.num_prefix_tokens + grid[0] * grid[1]:
      raise ValueError(
          f"relative position bias for a {grid[0]}x{grid[1]} grid with "
          f"{self.num_prefix_tokens} prefix tokens got {num_tokens} tokens")
    if grid != tuple(self.relative_grid):
      table = posemb_lib.resample_relative(table, self.relative_grid, grid,
                                           self.num_prefix_tokens, "bilinear")
    index = posemb_lib.relative_position_index(grid, self.num_prefix_tokens)
    bias = jnp.take(table, jnp.asarray(index), axis=0)  # [T, T, H]
    return jnp.transpose(bias, (2, 0, 1))[None]

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, *, head_mask=None,
               deterministic: bool = True, need_weights: bool = False,
               grid: Optional[Tuple[int, int]] = None):
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"hidden size {features} is not divisible by "
                       f"num_heads {self.num_heads}")
    head_dim = features // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.xavier_uniform())
    proj = lambda name: nn.DenseGeneral(  # pylint: disable=g-long-lambda
        features=(self.num_heads, head_dim), axis=-1, use_bias=self.qkv_bias,
        name=name, **kw)
    q = per_token(proj("query"), inputs_q)  # [B, T, H, D/H]
    k = per_token(proj("key"), inputs_kv)
    v = per_token(proj("value"), inputs_kv)
    scale = self.qk_scale if self.qk_scale is not None else head_dim**-0.5
    use_dropout = self.dropout_rate > 0 and not deterministic
    # The weights themselves are needed: returned, masked or dropped out.
    uses_weights = need_weights or head_mask is not None or use_dropout
    bias = None
    if self.relative_grid is not None:
      bias = self._relative_bias(grid, inputs_q.shape[1]).astype(q.dtype)
    impl = attention_impl(self.impl, uses_weights)
    weights = None
    if impl == "einsum":
      # Heads before tokens: both products are plain batched matmuls.
      q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, H, T, D/H]
      if not uses_weights:
        y = attention_core(q, k, v, bias, scale)
      else:
        logits = _attention_logits(q, k, bias, scale)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        weights = weights.astype(q.dtype)
        weights = nn.Dropout(rate=self.dropout_rate)(
            weights, deterministic=deterministic)
        if head_mask is not None:
          mask = head_mask.astype(weights.dtype)[None, :, None, None]
          weights = weights * mask
        y = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
      y = jnp.swapaxes(y, 1, 2)
    else:
      y = jax.nn.dot_product_attention(
          q, k, v, bias=bias, scale=scale,
          implementation=None if impl == "jax" else impl)
    if not need_weights:
      weights = None
    out = per_token(nn.DenseGeneral(features=features, axis=(-2, -1),
                                    name="out", **kw), y, in_dims=2)
    return out, weights


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x + MHA(LN(x)), then x + MLP(LN(x)), with drop path.

  Called as `block(x, (head_mask, drop_path_rate))` and returns
  `(x, (x or None, attention weights or None))` so that it can be scanned
  over layers; the per-layer outputs are None unless requested.
  `relative_grid`, `grid` and `num_prefix_tokens` configure the attention's
  relative position bias (posemb="relative"; none when relative_grid is None):
  the grid its table is built for and the grid of the tokens.
  """
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  hidden_act: str = "gelu_tanh"
  layer_norm_eps: float = 1e-6
  use_drop_path: bool = False
  deterministic: bool = True
  output_attentions: bool = False
  output_hidden_states: bool = False
  relative_grid: Optional[Tuple[int, int]] = None
  grid: Optional[Tuple[int, int]] = None
  num_prefix_tokens: int = 0
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _drop_path(self, y, rate):
    if not self.use_drop_path or self.deterministic:
      return y
    keep_prob = 1. - rate
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
    return jnp.where(keep, y / keep_prob, 0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, layer_inputs):
    head_mask, drop_path_rate = layer_inputs
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, name="LayerNorm_0", **kw)(x)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, qkv_bias=self.qkv_bias,
        qk_scale=self.qk_scale, dropout_rate=self.attention_dropout_rate,
        relative_grid=self.relative_grid,
        num_prefix_tokens=self.num_prefix_tokens, impl=self.attention_impl,
        name="MultiHeadDotProductAttention_1", **kw)(
            y, y, head_mask=head_mask, deterministic=self.deterministic,
            need_weights=self.output_attentions, grid=self.grid)
    y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=self.deterministic)
    x = x + self._drop_path(y, drop_path_rate)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, name="LayerNorm_2", **kw)(x)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 hidden_act=self.hidden_act, name="MlpBlock_3", **kw)(
                     y, deterministic=self.deterministic)
    x = x + self._drop_path(y, drop_path_rate)
    if not self.output_attentions:
      weights = None
    return x, (x if self.output_hidden_states else None, weights)


class PatchEmbedding(nn.Module):
  """The patch embedding: a conv of kernel = stride = patch, as one matmul.

  Parameters (and their initialisation) are `nn.Conv`'s: kernel
  [ph, pw, C, D], bias [D]. The image is cut into patches and multiplied by
  the flattened kernel, which XLA runs (and differentiates) faster on CPU
  than the strided convolution (docs/benchmarks.md). Trailing rows / columns
  that do not fill a patch are dropped, as the VALID convolution does.
  """
  features: int
  patch: Tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    (ph, pw), (b, hh, ww, c) = self.patch, x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (ph, pw, c, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      self.param_dtype)
    h, w = hh // ph, ww // pw
    x = x[:, :h * ph, :w * pw].reshape(b, h, ph, w, pw, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b * h * w, ph * pw * c)
    kernel = kernel.reshape(ph * pw * c, self.features)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = jnp.dot(x, kernel) + bias
    return y.reshape(b, h, w, self.features)


class AddPositionEmbs(nn.Module):
  """Adds the learned position embedding, resampled if the grid differs."""
  grid: Tuple[int, int]
  num_prefix_tokens: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, grid: Tuple[int, int]):
    num_positions = self.num_prefix_tokens + self.grid[0] * self.grid[1]
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                    (1, num_positions, x.shape[-1]), self.param_dtype)
    if tuple(grid) != tuple(self.grid):
      pe = posemb_lib.resample(pe, self.grid, grid, self.num_prefix_tokens,
                               "bicubic")
    return x + pe.astype(x.dtype)


def learn2d_table(row, col, num_prefix_tokens: int):
  """[1, prefix + h * w, D] from row [1, h, D/2] and col [1, w, D/2] tables.

  The patch at (i, j) gets concat(row[i], col[j]); the prefix (cls) positions
  get 0. numpy in, numpy out; jax arrays otherwise.
  """
  xp = np if isinstance(row, np.ndarray) and isinstance(col, np.ndarray) else jnp
  h, w, half = row.shape[1], col.shape[1], row.shape[2]
  rows = xp.broadcast_to(row[0][:, None, :], (h, w, half))
  cols = xp.broadcast_to(col[0][None, :, :], (h, w, col.shape[2]))
  grid = xp.concatenate([rows, cols], axis=-1).reshape(1, h * w, -1)
  prefix = xp.zeros((1, num_prefix_tokens, grid.shape[-1]), grid.dtype)
  return xp.concatenate([prefix, grid], axis=1)


class AddPositionEmbs2D(nn.Module):
  """Adds the learned 2-D position embedding (ViT paper, Table 8's "2-D").

  `pos_embedding_row` [1, h, D/2] and `pos_embedding_col` [1, w, D/2]: the patch
  at (i, j) gets concat(row[i], col[j]), the prefix (cls) tokens nothing. At
  another grid each table is resampled along its one axis.
  """
  grid: Tuple[int, int]
  num_prefix_tokens: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, grid: Tuple[int, int]):
    half = x.shape[-1] // 2
    init = nn.initializers.normal(stddev=0.02)
    row = self.param("pos_embedding_row", init, (1, self.grid[0], half),
                     self.param_dtype)
    col = self.param("pos_embedding_col", init, (1, self.grid[1], half),
                     self.param_dtype)
    if grid[0] != self.grid[0]:
      row = posemb_lib.resample(row, (self.grid[0], 1), (grid[0], 1), 0,
                                "bicubic")
    if grid[1] != self.grid[1]:
      col = posemb_lib.resample(col, (1, self.grid[1]), (1, grid[1]), 0,
                                "bicubic")
    table = learn2d_table(row, col, self.num_prefix_tokens)
    return x + table.astype(x.dtype)


def fixed_posemb(kind: str, grid: Tuple[int, int], num_prefix_tokens: int,
                 dim: int) -> np.ndarray:
  """Fixed table [1, prefix + h * w, dim]; sincos2d has 0 at the prefix."""
  if kind == "sincos2d":
    table = posemb_lib.sincos2d(grid[0], grid[1], dim)
    prefix = np.zeros((1, num_prefix_tokens, dim), np.float32)
    return np.concatenate([prefix, table], axis=1)
  if kind == "sincos1d":
    return posemb_lib.sincos1d(num_prefix_tokens + grid[0] * grid[1], dim)
  raise ValueError(f"unknown fixed position embedding {kind!r}")


class Encoder(nn.Module):
  """Position embeddings, dropout, the blocks and the final LayerNorm.

  posemb="relative" adds nothing to the tokens: every block's attention gets
  a relative position bias built for `grid` (see MultiHeadDotProductAttention).
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  grid: Tuple[int, int]
  num_prefix_tokens: int = 1
  posemb: str = "learn"
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  stochastic_depth: float = 0.
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  hidden_act: str = "gelu_tanh"
  layer_norm_eps: float = 1e-6
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _block_class(self):
    block = Encoder1DBlock
    if self.remat_policy != "none":
      policy = getattr(jax.checkpoint_policies, self.remat_policy)
      block = nn.remat(block, prevent_cse=not self.scan, policy=policy)
    if self.scan:
      block = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=0, length=self.num_layers)
    return block

  def _drop_path_rates(self):
    """Linearly increasing per-layer rates, 0 for the first block."""
    if self.num_layers == 1:
      return np.full((1,), self.stochastic_depth, np.float32)
    return np.linspace(0., self.stochastic_depth, self.num_layers,
                       dtype=np.float32)

  @nn.compact
  def __call__(self, x, grid: Tuple[int, int], *, train: bool = False,
               head_mask=None, output_attentions: bool = False,
               output_hidden_states: bool = False):
    out = {}
    if self.posemb == "learn":
      x = AddPositionEmbs(grid=self.grid,
                          num_prefix_tokens=self.num_prefix_tokens,
                          param_dtype=self.param_dtype,
                          name="posembed_input")(x, grid)
    elif self.posemb == "learn2d":
      x = AddPositionEmbs2D(grid=self.grid,
                            num_prefix_tokens=self.num_prefix_tokens,
                            param_dtype=self.param_dtype,
                            name="posembed_input")(x, grid)
    elif self.posemb not in ("none", "relative"):
      table = fixed_posemb(self.posemb, grid, self.num_prefix_tokens,
                           x.shape[-1])
      x = x + jnp.asarray(table, x.dtype)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    if output_hidden_states:
      out["embeddings"] = x

    rates = self._drop_path_rates()
    block_kw = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
        hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
        use_drop_path=self.stochastic_depth > 0, deterministic=not train,
        attention_impl=self.attention_impl,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.posemb == "relative":
      block_kw.update(relative_grid=tuple(self.grid), grid=tuple(grid),
                      num_prefix_tokens=self.num_prefix_tokens)
    block = self._block_class()
    if self.scan:
      x, (hidden, weights) = block(name="encoderblock", **block_kw)(
          x, (head_mask, jnp.asarray(rates)))
      hidden = [None if hidden is None else hidden[i]
                for i in range(self.num_layers)]
      weights = [None if weights is None else weights[i]
                 for i in range(self.num_layers)]
    else:
      hidden, weights = [], []
      for i in range(self.num_layers):
        layer_mask = None if head_mask is None else head_mask[i]
        x, (h, w) = block(name=f"encoderblock_{i}", **block_kw)(
            x, (layer_mask, float(rates[i])))
        hidden.append(h)
        weights.append(w)
    for i in range(self.num_layers):
      if output_hidden_states:
        out[f"block{i}"] = hidden[i]
      if output_attentions:
        out[f"block{i}/attention"] = weights[i]
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="encoder_norm",
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x, out


class MAPHead(nn.Module):
  """Multi-head attention pooling with a learned probe (as big_vision)."""
  num_heads: int
  mlp_dim: int
  hidden_act: str = "gelu_tanh"
  layer_norm_eps: float = 1e-6
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d),
                       self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x, _ = MultiHeadDotProductAttention(
        num_heads=self.num_heads, impl=self.attention_impl,
        name="MultiHeadDotProductAttention_0", **kw)(probe, x)
    y = nn.LayerNorm(epsilon=self.layer_norm_eps, name="LayerNorm_0", **kw)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, hidden_act=self.hidden_act,
                     name="MlpBlock_0", **kw)(y)
    return x[:, 0]


def pixel_shuffle(x, r: int):
  """NHWC depth-to-space in PyTorch's channel order (c * r * r + i * r + j)."""
  b, h, w, crr = x.shape
  c = crr // (r * r)
  x = x.reshape(b, h, w, c, r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c)


class VisionTransformer(nn.Module):
  """ViT with optional hybrid stem, mask token, MIM decoder and pooled heads.

  Attributes:
    num_classes: head outputs; 1 for regression, 0 for no head (the output is
      then the pre_logits vector).
    patch_size: int or (ph, pw); with a hybrid stem, patches of its features.
    hidden_size, num_layers, num_heads, mlp_dim: the Transformer's size.
    image_size: int or (h, w) the position embeddings are built for.
    num_channels: image channels (the decoder reconstructs as many).
    classifier: "token" (cls token), "gap" (mean of the tokens after
      encoder_norm), "map" (attention pooling) or "unpooled" (all tokens).
    posemb: "learn" (1-D table), "learn2d" (row and column tables of D/2,
      concatenated; none at the cls token), "sincos2d", "sincos1d", "none",
      or "relative" (nothing added to the tokens; a learned relative position
      bias on every block's attention logits, as BEiT: per block a table
      [(2h - 1) * (2w - 1) + 3 with a cls token, num_heads], zeros at init,
      resampled bilinearly at another grid).
    representation_size: width of the Dense + tanh `pre_logits` layer, if any.
    dropout_rate, attention_dropout_rate: dropout on activations / on the
      attention probabilities, in train mode only.
    stochastic_depth: drop-path rate of the last block; per-sample, rising
      linearly from 0 at the first block.
    qkv_bias, qk_scale: attention biases; logits scale (head_dim ** -0.5 if
      None).
    hidden_act: "gelu_tanh" (the original models) or "gelu" (exact erf).
    layer_norm_eps: epsilon of every LayerNorm.
    head_bias_init: initial value of the head's bias (its kernel is zeros).
    scan, remat_policy: scan the blocks (params stacked under
      Transformer/encoderblock); rematerialize them with a
      `jax.checkpoint_policies` name, or "none".
    attention_impl: the attention kernel, `ATTENTION_IMPLS`: "auto" (the
      einsum path on CPU; elsewhere `jax.nn.dot_product_attention`, which
      picks cuDNN's fused kernel on a GPU where it can), "einsum", "xla" or
      "cudnn" (that implementation of `jax.nn.dot_product_attention`); the
      parameters are the same.
    dtype, param_dtype: compute and parameter dtypes.
    use_mask_token: create `mask_token` for `bool_masked_pos`.
    decoder: add the SimMIM decoder (1x1 conv + pixel shuffle); the output is
      then the reconstruction [B, H, W, C]. Implies a mask token.
    resnet: None or dict(num_layers=(3, 4, 9), width_factor=1): BiT ResNet
      stem of a hybrid model.
  """
  num_classes: int = 1000
  patch_size: IntOrPair = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  image_size: IntOrPair = 224
  num_channels: int = 3
  classifier: str = "token"
  posemb: str = "learn"
  representation_size: Optional[int] = None
  dropout_rate: float = 0.
  attention_dropout_rate: float = 0.
  stochastic_depth: float = 0.
  qkv_bias: bool = True
  qk_scale: Optional[float] = None
  hidden_act: str = "gelu_tanh"
  layer_norm_eps: float = 1e-6
  head_bias_init: float = 0.
  scan: bool = False
  remat_policy: str = "none"
  attention_impl: str = "auto"
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  use_mask_token: bool = False
  decoder: bool = False
  resnet: Optional[Any] = None

  def __post_init__(self):
    # Sequences and the resnet dict become tuples / FrozenDict: the module
    # stays hashable (usable as a static argument) and equal across configs.
    for field in ("patch_size", "image_size"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)):
        object.__setattr__(self, field, tuple(int(v) for v in value))
    if self.resnet is not None:
      resnet = dict(self.resnet)
      resnet["num_layers"] = tuple(resnet.get("num_layers", ()))
      object.__setattr__(self, "resnet", flax.core.FrozenDict(resnet))
    super().__post_init__()
    self.check()

  def check(self):
    """Raises ValueError for inconsistent fields."""
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")
    for field, value, known in (("classifier", self.classifier, CLASSIFIERS),
                                ("posemb", self.posemb, POSEMBS),
                                ("hidden_act", self.hidden_act, ACTIVATIONS),
                                ("attention_impl", self.attention_impl,
                                 ATTENTION_IMPLS)):
      if value not in known:
        raise ValueError(f"unknown {field} {value!r}: use one of {known}")
    if self.posemb == "sincos2d" and self.hidden_size % 4:
      raise ValueError(f"posemb='sincos2d' needs hidden_size divisible by 4, "
                       f"got {self.hidden_size}")
    if self.posemb == "learn2d" and self.hidden_size % 2:
      raise ValueError(f"posemb='learn2d' needs an even hidden_size (row and "
                       f"column tables of hidden_size / 2), got "
                       f"{self.hidden_size}")
    if (self.remat_policy != "none" and
        not hasattr(jax.checkpoint_policies, self.remat_policy)):
      known = [n for n in dir(jax.checkpoint_policies) if not n.startswith("_")]
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}: use "
                       f"'none' or a jax.checkpoint_policies name {known}")
    checks.check_dtypes(self)
    pair(self.patch_size, "patch_size")
    pair(self.image_size, "image_size")
    sh, sw = self.encoder_stride
    if self.decoder and sh != sw:
      raise ValueError(
          f"decoder=True needs the encoder stride (= patch size) to be square "
          f"for the pixel shuffle, got patch size {(sh, sw)}")
    if self.resnet is not None:
      unknown = set(dict(self.resnet)) - {"num_layers", "width_factor"}
      if unknown:
        raise ValueError(f"unknown resnet fields {sorted(unknown)}: use "
                         "num_layers and width_factor")

  @property
  def num_prefix_tokens(self) -> int:
    return 1 if self.classifier == "token" else 0

  @property
  def encoder_stride(self) -> Tuple[int, int]:
    """Pixels per patch along (h, w), including a hybrid stem's stride."""
    ph, pw = pair(self.patch_size, "patch_size")
    s = 1
    if self.resnet is not None:
      s = resnet_lib.stride(dict(self.resnet).get("num_layers", ()))
    return (ph * s, pw * s)

  def grid_size(self, image_size: IntOrPair) -> Tuple[int, int]:
    """Patch grid (h, w) of an image size; ValueError if not divisible."""
    h, w = pair(image_size, "image_size")
    sh, sw = self.encoder_stride
    if h % sh or w % sw:
      stride = sh if sh == sw else (sh, sw)
      raise ValueError(f"image size {(h, w)} is not divisible by patch size "
                       f"{stride}")
    return (h // sh, w // sw)

  @property
  def num_patches(self) -> int:
    h, w = self.grid_size(self.image_size)
    return h * w

  def _embed(self, images, dtype, param_dtype):
    x = images
    if self.resnet is not None:
      cfg = dict(self.resnet)
      x = resnet_lib.stem(x, cfg.get("num_layers", ()),
                          cfg.get("width_factor", 1), dtype=dtype,
                          param_dtype=param_dtype)
    patch = pair(self.patch_size, "patch_size")
    return PatchEmbedding(features=self.hidden_size, patch=patch,
                          dtype=dtype, param_dtype=param_dtype,
                          name="embedding")(x)

  def _apply_mask(self, x, bool_masked_pos, param_dtype):
    """HF: embeddings * (1 - w) + mask_token * w, w = bool_masked_pos."""
    use_mask_token = self.use_mask_token or self.decoder
    mask_token = None
    if use_mask_token:
      mask_token = self.param("mask_token", nn.initializers.zeros,
                              (1, 1, self.hidden_size), param_dtype)
    if bool_masked_pos is None:
      return x
    if mask_token is None:
      raise ValueError("bool_masked_pos was given but the model has no mask "
                       "token: create it with use_mask_token=True")
    b, n, _ = x.shape
    if tuple(bool_masked_pos.shape) != (b, n):
      raise ValueError(f"bool_masked_pos must have shape [batch, num_patches] "
                       f"= {(b, n)}, got {tuple(bool_masked_pos.shape)}")
    w = bool_masked_pos[..., None].astype(x.dtype)
    return x * (1. - w) + mask_token.astype(x.dtype) * w

  def _check_grid(self, grid, built, images_shape, interpolate_pos_encoding):
    if grid == built or self.posemb == "none" or interpolate_pos_encoding:
      return
    raise ValueError(
        f"image size {tuple(images_shape[1:3])} gives a {grid[0]}x{grid[1]} "
        f"patch grid but the model was built for image_size "
        f"{pair(self.image_size)} ({built[0]}x{built[1]}): pass "
        "interpolate_pos_encoding=True to resample the position embeddings, "
        "or set image_size")

  def _head_mask(self, head_mask):
    """Returns head_mask as [num_layers, num_heads] or None."""
    if head_mask is None:
      return None
    head_mask = jnp.asarray(head_mask)
    shape = (self.num_layers, self.num_heads)
    if head_mask.shape == (self.num_heads,):
      return jnp.broadcast_to(head_mask[None], shape)
    if head_mask.shape != shape:
      raise ValueError(f"head_mask must have shape [num_heads] = "
                       f"{(self.num_heads,)} or [num_layers, num_heads] = "
                       f"{shape}, got {head_mask.shape}")
    return head_mask

  def _pool(self, x, dtype, param_dtype):
    if self.classifier == "token":
      return x[:, 0]
    if self.classifier == "gap":
      return jnp.mean(x, axis=1)
    if self.classifier == "map":
      return MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                     hidden_act=self.hidden_act,
                     layer_norm_eps=self.layer_norm_eps,
                     attention_impl=self.attention_impl, dtype=dtype,
                     param_dtype=param_dtype, name="MAPHead_0")(x)
    return x

  def _decode(self, x, grid, dtype, param_dtype):
    """1x1 conv to stride**2 * C channels, then pixel shuffle."""
    r = self.encoder_stride[0]
    b = x.shape[0]
    x = x[:, self.num_prefix_tokens:].reshape(b, grid[0], grid[1], -1)
    x = nn.Conv(features=r * r * self.num_channels, kernel_size=(1, 1),
                name="decoder", dtype=dtype, param_dtype=param_dtype)(x)
    return pixel_shuffle(x, r)

  @nn.compact
  def __call__(self, images, train: bool = False, *, bool_masked_pos=None,
               interpolate_pos_encoding: bool = False, head_mask=None,
               output_attentions: bool = False,
               output_hidden_states: bool = False):
    dtype = jnp.dtype(self.dtype)
    param_dtype = jnp.dtype(self.param_dtype)
    checks.check_images(images, self.num_channels)
    grid = self.grid_size(images.shape[1:3])
    built = self.grid_size(self.image_size)
    self._check_grid(grid, built, images.shape, interpolate_pos_encoding)
    out = {}

    x = self._embed(images.astype(dtype), dtype, param_dtype)
    out["stem"] = x
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    x = self._apply_mask(x, bool_masked_pos, param_dtype)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(dtype), [b, 1, 1]), x], axis=1)

    x, encoder_out = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim,
        num_heads=self.num_heads, grid=built,
        num_prefix_tokens=self.num_prefix_tokens, posemb=self.posemb,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, qkv_bias=self.qkv_bias,
        qk_scale=self.qk_scale, hidden_act=self.hidden_act,
        layer_norm_eps=self.layer_norm_eps, scan=self.scan,
        remat_policy=self.remat_policy, attention_impl=self.attention_impl,
        dtype=dtype, param_dtype=param_dtype, name="Transformer")(
            x, grid, train=train, head_mask=self._head_mask(head_mask),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states)
    out.update(encoder_out)
    out["encoded"] = x
    out["patch_mean"] = jnp.mean(x[:, self.num_prefix_tokens:], axis=1)

    x = self._pool(x, dtype, param_dtype)
    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, name="pre_logits", dtype=dtype,
                   param_dtype=param_dtype)(x)
      x = jnp.tanh(x)
    out["pre_logits"] = x
    output = x
    if self.num_classes:
      logits = nn.Dense(
          self.num_classes, name="head", dtype=dtype, param_dtype=param_dtype,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init))(x)
      output = out["logits"] = logits.astype(jnp.float32)
    if self.decoder:
      output = self._decode(out["encoded"], grid, dtype, param_dtype)
      output = out["reconstruction"] = output.astype(jnp.float32)
    return output, out
