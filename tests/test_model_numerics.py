"""Numerical tests of the ViT forward pass against a numpy reference.

The reference implements the paper's equations directly (float64):
z = x + MSA(LN(x)); z = z + MLP(LN(z)). Parameters are random (not the
initialisation) so that every bias, scale and token matters. Tiny models,
each function compiled once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vit_jax import losses
from vit_jax import models
from vit_jax import posemb
from vit_jax.models import vit

RNG = {"params": jax.random.PRNGKey(0)}
BATCH = 2
# Compile fast: these tests check values, not XLA's optimisations.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def random_params(model, shape, seed=0, scale=0.3):
  """Random float32 parameters with the model's tree (no init compile)."""
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  tree = jax.eval_shape(model.init, RNG, images)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s.shape) * scale).astype(np.float32), tree)


def random_images(shape, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def apply_fn(model, **kwargs):
  return jit(functools.partial(model.apply, **kwargs))


# ---------------------------------------------------------------- reference


def ln(p, x, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x, approximate=True):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))


def dense(p, x):
  return x @ p["kernel"] + p["bias"]


def attention(p, xq, xkv, scale=None, head_mask=None, bias=None):
  """Returns (output [B, T, D], weights [B, H, T, S]); bias [H, T, S]."""
  def proj(name, x):
    y = np.einsum("btd,dhk->bthk", x, p[name]["kernel"])
    return y + p[name]["bias"] if "bias" in p[name] else y
  q, k, v = proj("query", xq), proj("key", xkv), proj("value", xkv)
  scale = q.shape[-1]**-0.5 if scale is None else scale
  logits = np.einsum("bqhk,bshk->bhqs", q, k) * scale
  if bias is not None:
    logits = logits + bias[None]
  weights = scipy.special.softmax(logits, axis=-1)
  if head_mask is not None:
    weights = weights * head_mask[None, :, None, None]
  ctx = np.einsum("bhqs,bshk->bqhk", weights, v)
  out = np.einsum("bqhk,hkd->bqd", ctx, p["out"]["kernel"]) + p["out"]["bias"]
  return out, weights


def mlp(p, x, approximate=True):
  return dense(p["Dense_1"], gelu(dense(p["Dense_0"], x), approximate))


def block(p, x, eps=1e-6, approximate=True, scale=None, head_mask=None,
          bias=None):
  y, weights = attention(p["MultiHeadDotProductAttention_1"],
                         ln(p["LayerNorm_0"], x, eps),
                         ln(p["LayerNorm_0"], x, eps), scale, head_mask, bias)
  x = x + y
  x = x + mlp(p["MlpBlock_3"], ln(p["LayerNorm_2"], x, eps), approximate)
  return x, weights


def patch_embed(p, images, ph, pw):
  b, h, w, c = images.shape
  patches = images.reshape(b, h // ph, ph, w // pw, pw, c)
  return np.einsum("byixjc,ijcd->byxd", patches, p["kernel"]) + p["bias"]


def to64(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------- the reference model (A)

# Non-square image (16 x 24), non-square patch (8 x 4): a 2 x 6 grid.
A_SHAPE = (BATCH, 16, 24, 3)
A_CONFIG = dict(num_layers=2, image_size=(16, 24), patch_size=(8, 4),
                num_classes=5)


@pytest.fixture(scope="module")
def model_a():
  model = models.create("testing", **A_CONFIG)
  params = random_params(model, A_SHAPE)
  images = random_images(A_SHAPE)
  full = apply_fn(model, output_attentions=True, output_hidden_states=True)(
      {"params": params}, images)
  return model, params, images, full


def test_forward_matches_reference(model_a):
  _, params, images, (logits, out) = model_a
  p = to64(params)
  x = images.astype(np.float64)
  stem = patch_embed(p["embedding"], x, 8, 4)
  np.testing.assert_allclose(out["stem"], stem, rtol=1e-4, atol=1e-4)
  tokens = stem.reshape(BATCH, 12, 16)
  cls = np.broadcast_to(p["cls"], (BATCH, 1, 16))
  x = np.concatenate([cls, tokens], axis=1)
  x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(out["embeddings"], x, rtol=1e-4, atol=1e-4)
  for i in range(2):
    x, weights = block(p["Transformer"][f"encoderblock_{i}"], x)
    np.testing.assert_allclose(out[f"block{i}"], x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[f"block{i}/attention"], weights,
                               rtol=1e-4, atol=1e-5)
  encoded = ln(p["Transformer"]["encoder_norm"], x)
  np.testing.assert_allclose(out["encoded"], encoded, rtol=1e-4, atol=1e-4)
  # The few-shot representation "patch_mean": the mean over patch tokens.
  np.testing.assert_allclose(out["patch_mean"], encoded[:, 1:].mean(1),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["pre_logits"], encoded[:, 0], rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(logits, dense(p["head"], encoded[:, 0]),
                             rtol=1e-4, atol=1e-4)


def test_attention_weights_rows_sum_to_one(model_a):
  _, _, _, (_, out) = model_a
  for i in range(2):
    weights = np.asarray(out[f"block{i}/attention"])
    assert weights.shape == (BATCH, 2, 13, 13)
    assert np.all(weights >= 0)
    np.testing.assert_allclose(weights.sum(-1), 1., atol=1e-5)


def test_dot_product_attention_path_equals_explicit(model_a):
  model, params, images, (logits, out) = model_a
  fast_logits, fast_out = apply_fn(model)({"params": params}, images)
  assert "block0/attention" not in fast_out
  np.testing.assert_allclose(fast_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast_out["encoded"], out["encoded"], rtol=1e-5,
                             atol=1e-5)


def test_head_mask_by_hand(model_a):
  model, params, images, (logits, out) = model_a
  head_mask = np.array([[0., 1.], [1., .5]], np.float32)
  masked_logits, masked = apply_fn(model, output_hidden_states=True)(
      {"params": params}, images, head_mask=head_mask)
  p = to64(params)
  x = np.asarray(out["embeddings"], np.float64)
  for i in range(2):
    x, _ = block(p["Transformer"][f"encoderblock_{i}"], x,
                 head_mask=head_mask[i])
    np.testing.assert_allclose(masked[f"block{i}"], x, rtol=1e-4, atol=1e-4)
  assert not np.allclose(masked_logits, logits, atol=1e-3)
  # A [num_heads] mask applies to every layer.
  per_head = apply_fn(model)({"params": params}, images,
                             head_mask=np.array([1., 0.], np.float32))[0]
  per_layer = apply_fn(model)({"params": params}, images,
                              head_mask=np.array([[1., 0.], [1., 0.]],
                                                 np.float32))[0]
  np.testing.assert_allclose(per_head, per_layer, rtol=1e-6)


def test_scan_equals_per_block(model_a):
  _, params, images, (logits, out) = model_a
  stacked = dict(params)
  stacked["Transformer"] = {
      k: v for k, v in params["Transformer"].items()
      if not k.startswith("encoderblock_")}
  stacked["Transformer"]["encoderblock"] = jax.tree_util.tree_map(
      lambda *xs: np.stack(xs), params["Transformer"]["encoderblock_0"],
      params["Transformer"]["encoderblock_1"])
  for scan, remat in ((True, "none"), (True, "nothing_saveable"),
                      (False, "dots_saveable")):
    model = models.create("testing", scan=scan, remat_policy=remat,
                          **A_CONFIG)
    scan_logits, scan_out = apply_fn(
        model, output_attentions=True, output_hidden_states=True)(
            {"params": stacked if scan else params}, images)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-5)
    for i in range(2):
      np.testing.assert_allclose(scan_out[f"block{i}"], out[f"block{i}"],
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(scan_out[f"block{i}/attention"],
                                 out[f"block{i}/attention"], rtol=1e-5,
                                 atol=1e-6)


def reference_logits_a(params, images):
  """Model A's logits by the reference equations (float64)."""
  p = to64(params)
  tokens = patch_embed(p["embedding"], images.astype(np.float64), 8, 4)
  cls = np.broadcast_to(p["cls"], (BATCH, 1, 16))
  x = np.concatenate([cls, tokens.reshape(BATCH, 12, 16)], axis=1)
  x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
  for i in range(2):
    x, _ = block(p["Transformer"][f"encoderblock_{i}"], x)
  encoded = ln(p["Transformer"]["encoder_norm"], x)
  return dense(p["head"], encoded[:, 0])


def test_bfloat16_compute_with_float32_params(model_a):
  _, params, images, _ = model_a
  model = models.create("testing", dtype="bfloat16", **A_CONFIG)
  bf_logits, out = apply_fn(model)({"params": params}, images)
  assert out["encoded"].dtype == jnp.bfloat16
  assert bf_logits.dtype == jnp.float32
  assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
  # bfloat16 keeps 8 bits of mantissa: through two blocks the logits stay
  # within 2% of the largest magnitude of the float64 reference (0.15% to
  # 0.43% measured with three seeds).
  want = reference_logits_a(params, images)
  scale = np.abs(want).max()
  assert scale > 0.1
  np.testing.assert_allclose(bf_logits, want, atol=0.02 * scale)


def test_options_against_reference():
  """qkv_bias=False, qk_scale, exact GELU and layer_norm_eps."""
  shape = (BATCH, 16, 16, 3)
  eps, qk_scale = 1e-2, 0.9
  model = models.create("testing", image_size=16, qkv_bias=False,
                        qk_scale=qk_scale, hidden_act="gelu",
                        layer_norm_eps=eps)
  params = random_params(model, shape, scale=0.5)
  images = random_images(shape)
  _, out = apply_fn(model, output_hidden_states=True)({"params": params},
                                                       images)
  p = to64(params)
  x, _ = block(p["Transformer"]["encoderblock_0"],
               np.asarray(out["embeddings"], np.float64), eps=eps,
               approximate=False, scale=qk_scale)
  np.testing.assert_allclose(out["block0"], x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["encoded"],
                             ln(p["Transformer"]["encoder_norm"], x, eps),
                             rtol=1e-4, atol=1e-4)


# ------------------------------------------------------ init and pooling


def test_init_values():
  model = models.create("testing", head_bias_init=-2., num_layers=1,
                        image_size=32, patch_size=2, hidden_size=32,
                        use_mask_token=True)
  images = random_images((BATCH, 32, 32, 3))
  init_and_apply = jit(lambda x: (lambda v: (v, model.apply(v, x)[0]))(
      model.init(RNG, x)))
  variables, logits = init_and_apply(images)
  params = variables["params"]
  np.testing.assert_array_equal(params["head"]["kernel"], 0.)
  np.testing.assert_array_equal(params["head"]["bias"], -2.)
  np.testing.assert_array_equal(params["cls"], 0.)
  np.testing.assert_array_equal(params["mask_token"], 0.)
  pe = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert pe.shape == (1, 257, 32)
  assert 0.015 < pe.std() < 0.025 and abs(pe.mean()) < 0.005
  np.testing.assert_array_equal(logits, -2.)


@pytest.mark.parametrize("classifier", ["gap", "unpooled"])
def test_pooling(classifier):
  shape = (BATCH, 16, 16, 3)
  model = models.create("testing", image_size=16, classifier=classifier,
                        representation_size=6)
  params = random_params(model, shape)
  logits, out = apply_fn(model)({"params": params}, random_images(shape))
  p = to64(params)
  encoded = np.asarray(out["encoded"], np.float64)
  assert encoded.shape == (BATCH, 4, 16)  # No cls token.
  pooled = encoded.mean(1) if classifier == "gap" else encoded
  pre_logits = np.tanh(dense(p["pre_logits"], pooled))
  np.testing.assert_allclose(out["pre_logits"], pre_logits, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(logits, dense(p["head"], pre_logits), rtol=1e-4,
                             atol=1e-5)


def test_map_pooling_by_hand():
  shape = (BATCH, 16, 16, 3)
  model = models.create("testing", image_size=16, classifier="map",
                        num_classes=0)
  params = random_params(model, shape)
  output, out = apply_fn(model)({"params": params}, random_images(shape))
  p = to64(params)["MAPHead_0"]
  encoded = np.asarray(out["encoded"], np.float64)
  probe = np.broadcast_to(p["probe"], (BATCH, 1, 16))
  x, _ = attention(p["MultiHeadDotProductAttention_0"], probe, encoded)
  x = x + mlp(p["MlpBlock_0"], ln(p["LayerNorm_0"], x))
  np.testing.assert_allclose(output, x[:, 0], rtol=1e-4, atol=1e-4)


# ------------------------------------------- tokens, masks, resolutions


def test_mask_token_and_decoder_by_hand():
  shape = (BATCH, 8, 12, 3)  # Patch 4: a 2 x 3 grid.
  model = models.create("testing", image_size=(8, 12), patch_size=4,
                        decoder=True)
  params = random_params(model, shape)
  images = random_images(shape)
  mask = np.array([[1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], bool)
  recon, out = apply_fn(model, output_hidden_states=True)(
      {"params": params}, images, bool_masked_pos=mask)
  p = to64(params)
  tokens = np.asarray(out["stem"], np.float64).reshape(BATCH, 6, 16)
  tokens = np.where(mask[..., None], p["mask_token"], tokens)
  x = np.concatenate([np.broadcast_to(p["cls"], (BATCH, 1, 16)), tokens], 1)
  x = x + p["Transformer"]["posembed_input"]["pos_embedding"]
  np.testing.assert_allclose(out["embeddings"], x, rtol=1e-5, atol=1e-5)
  # Decoder: 1x1 conv on the patch tokens, then PixelShuffle's channel order.
  grid = np.asarray(out["encoded"], np.float64)[:, 1:].reshape(BATCH, 2, 3, 16)
  feats = grid @ p["decoder"]["kernel"][0, 0] + p["decoder"]["bias"]
  expected = np.zeros(shape)
  r = 4
  for y in range(2):
    for x_ in range(3):
      for c in range(3):
        for i in range(r):
          for j in range(r):
            expected[:, y * r + i, x_ * r + j, c] = feats[:, y, x_,
                                                          c * r * r + i * r + j]
  assert recon.shape == shape
  np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["reconstruction"], recon)
  loss = losses.masked_l1(images, recon, mask, 4)
  assert np.isfinite(loss) and loss > 0


def test_pixel_shuffle_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 3, 4, 2 * 9)).astype(np.float32)
  ours = vit.pixel_shuffle(jnp.asarray(x), 3)
  ref = torch.nn.PixelShuffle(3)(torch.from_numpy(x).permute(0, 3, 1, 2))
  np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("kind", ["learn", "sincos2d", "sincos1d", "none"])
def test_interpolate_pos_encoding(kind):
  model = models.create("testing", image_size=16, posemb=kind)
  params = random_params(model, (BATCH, 16, 16, 3))
  images = random_images((BATCH, 24, 16, 3))  # 3 x 2 grid instead of 2 x 2.
  _, out = apply_fn(model, output_hidden_states=True,
                    interpolate_pos_encoding=kind != "none")(
                        {"params": params}, images)
  stem = np.asarray(out["stem"]).reshape(BATCH, 6, 16)
  x = np.concatenate([np.broadcast_to(params["cls"], (BATCH, 1, 16)), stem],
                     axis=1)
  if kind == "learn":
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    table = posemb.resample(pe, (2, 2), (3, 2), 1, "bicubic")
  elif kind == "sincos2d":
    table = np.concatenate([np.zeros((1, 1, 16)),
                            posemb.sincos2d(3, 2, 16)], axis=1)
  elif kind == "sincos1d":
    table = posemb.sincos1d(7, 16)
  else:
    table = 0.
  np.testing.assert_allclose(out["embeddings"], x + table, rtol=1e-5,
                             atol=1e-5)


def learn2d_reference(row, col, prefix):
  """Patch (i, j) gets concat(row[i], col[j]); the prefix positions get 0."""
  row, col = np.asarray(row, np.float64)[0], np.asarray(col, np.float64)[0]
  h, w = len(row), len(col)
  table = np.zeros((1, prefix + h * w, row.shape[1] + col.shape[1]))
  for i in range(h):
    for j in range(w):
      table[0, prefix + i * w + j] = np.concatenate([row[i], col[j]])
  return table


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_learn2d_embeddings(classifier):
  shape = (BATCH, 16, 24, 3)  # Patch 4: a 4 x 6 grid.
  model = models.create("testing", image_size=(16, 24), patch_size=4,
                        classifier=classifier, posemb="learn2d")
  params = random_params(model, shape)
  pe = params["Transformer"]["posembed_input"]
  row, col = pe["pos_embedding_row"], pe["pos_embedding_col"]
  assert set(pe) == {"pos_embedding_row", "pos_embedding_col"}
  assert row.shape == (1, 4, 8) and col.shape == (1, 6, 8)
  prefix = 1 if classifier == "token" else 0

  def tokens(out, n):
    x = np.asarray(out["stem"], np.float64).reshape(BATCH, n, 16)
    if prefix:
      cls = np.broadcast_to(params["cls"], (BATCH, 1, 16))
      x = np.concatenate([cls, x], axis=1)
    return x

  _, out = apply_fn(model, output_hidden_states=True)({"params": params},
                                                      random_images(shape))
  np.testing.assert_allclose(out["embeddings"],
                             tokens(out, 24) + learn2d_reference(row, col, prefix),
                             rtol=1e-5, atol=1e-5)
  # Another grid (5 x 3): each table resampled along its own axis (bicubic).
  _, out = apply_fn(model, output_hidden_states=True,
                    interpolate_pos_encoding=True)(
                        {"params": params}, random_images((BATCH, 20, 12, 3)))
  row5 = posemb.interpolation_matrix(4, 5, "bicubic") @ row[0]
  col3 = posemb.interpolation_matrix(6, 3, "bicubic") @ col[0]
  table = learn2d_reference(row5[None], col3[None], prefix)
  np.testing.assert_allclose(out["embeddings"], tokens(out, 15) + table,
                             rtol=1e-5, atol=1e-5)


def relative_bias_reference(table, h, w, prefix):
  """BEiT's bias [H, T, T] from a table [(2h-1)(2w-1) + 3 * prefix, H].

  Built with loops over query (r1, c1) and key (r2, c2) patches; with a cls
  token at 0: cls -> patch n, patch -> cls n + 1, cls -> cls n + 2.
  """
  table = np.asarray(table, np.float64)
  n = (2 * h - 1) * (2 * w - 1)
  t = prefix + h * w
  index = np.zeros((t, t), np.int64)
  for r1 in range(h):
    for c1 in range(w):
      for r2 in range(h):
        for c2 in range(w):
          index[prefix + r1 * w + c1, prefix + r2 * w + c2] = (
              (r1 - r2 + h - 1) * (2 * w - 1) + (c1 - c2 + w - 1))
  if prefix:
    for j in range(1, t):
      index[0, j] = n
      index[j, 0] = n + 1
    index[0, 0] = n + 2
  return table[index].transpose(2, 0, 1)


def relative_forward_reference(params, out, h, w, prefix, layers):
  """Blocks of the numpy reference from the model's embeddings, bias added."""
  p = to64(params)
  x = np.asarray(out["embeddings"], np.float64)
  blocks, weights = [], []
  for i in range(layers):
    bp = p["Transformer"][f"encoderblock_{i}"]
    table = bp["MultiHeadDotProductAttention_1"]["relative_position_bias"]
    x, wts = block(bp, x, bias=relative_bias_reference(table, h, w, prefix))
    blocks.append(x)
    weights.append(wts)
  return p, blocks, weights


def stack_blocks(params, layers):
  stacked = dict(params)
  stacked["Transformer"] = {k: v for k, v in params["Transformer"].items()
                            if not k.startswith("encoderblock_")}
  stacked["Transformer"]["encoderblock"] = jax.tree_util.tree_map(
      lambda *xs: np.stack(xs),
      *[params["Transformer"][f"encoderblock_{i}"] for i in range(layers)])
  return stacked


@pytest.mark.parametrize("classifier,scan", [("token", False), ("gap", False),
                                             ("token", True)])
def test_relative_bias_against_reference(classifier, scan):
  """Non-square 4 x 6 grid, random (non-zero) tables, weights post-softmax."""
  shape = (BATCH, 16, 24, 3)
  kw = dict(image_size=(16, 24), patch_size=4, classifier=classifier,
            num_layers=2, posemb="relative")
  model = models.create("testing", **kw)
  params = random_params(model, shape)
  images = random_images(shape)
  prefix = 1 if classifier == "token" else 0
  applied = stack_blocks(params, 2) if scan else params
  scan_model = models.create("testing", scan=scan, **kw)
  logits, out = apply_fn(scan_model, output_attentions=True,
                         output_hidden_states=True)({"params": applied}, images)
  stem = np.asarray(out["stem"], np.float64).reshape(BATCH, 24, 16)
  if prefix:  # Nothing is added to the tokens.
    stem = np.concatenate([np.broadcast_to(params["cls"], (BATCH, 1, 16)),
                           stem], axis=1)
  np.testing.assert_allclose(out["embeddings"], stem, rtol=1e-6, atol=1e-6)
  p, blocks, weights = relative_forward_reference(params, out, 4, 6, prefix, 2)
  for i in range(2):
    np.testing.assert_allclose(out[f"block{i}"], blocks[i], rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(out[f"block{i}/attention"], weights[i],
                               rtol=1e-4, atol=1e-5)
  encoded = ln(p["Transformer"]["encoder_norm"], blocks[-1])
  pooled = encoded[:, 0] if prefix else encoded.mean(1)
  np.testing.assert_allclose(logits, dense(p["head"], pooled), rtol=1e-4,
                             atol=1e-4)
  # The dot_product_attention path adds the same bias.
  fast_logits, fast_out = apply_fn(scan_model)({"params": applied}, images)
  np.testing.assert_allclose(fast_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fast_out["encoded"], out["encoded"], rtol=1e-5,
                             atol=1e-5)


def test_relative_bias_at_another_grid():
  """interpolate_pos_encoding: offsets resized bilinearly per head, cls kept."""
  shape = (BATCH, 16, 16, 3)  # Patch 8: a 2 x 2 grid, 3 x 3 offsets + 3.
  model = models.create("testing", image_size=16, posemb="relative")
  params = random_params(model, shape)
  block0 = params["Transformer"]["encoderblock_0"]
  attn = block0["MultiHeadDotProductAttention_1"]
  table = np.asarray(attn["relative_position_bias"])
  assert table.shape == (9 + 3, 2)
  images = random_images((BATCH, 24, 32, 3))  # A 3 x 4 grid: 5 x 7 offsets.
  with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
    apply_fn(model)({"params": params}, images)
  fn = apply_fn(model, output_attentions=True, output_hidden_states=True,
                interpolate_pos_encoding=True)
  _, out = fn({"params": params}, images)
  offsets = table[:9].reshape(3, 3, 2)
  mat_h = posemb.interpolation_matrix(3, 5, "bilinear")
  mat_w = posemb.interpolation_matrix(3, 7, "bilinear")
  resized = np.einsum("yh,xw,hwc->yxc", mat_h, mat_w, offsets).reshape(35, 2)
  resized = np.concatenate([resized, table[9:]])
  x = np.asarray(out["embeddings"], np.float64)
  p = to64(params)["Transformer"]["encoderblock_0"]
  expected, wts = block(p, x, bias=relative_bias_reference(resized, 3, 4, 1))
  np.testing.assert_allclose(out["block0"], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(out["block0/attention"], wts, rtol=1e-4,
                             atol=1e-5)
  # A table constant per head over the offsets stays constant: the bias of the
  # 3 x 4 grid has that constant on every patch pair and the cls entries kept.
  const = np.concatenate([np.broadcast_to([[0.7, -1.1]], (9, 2)),
                          [[2., 3.], [-4., 5.], [6., -7.]]]).astype(np.float32)
  new = posemb.resample_relative(const, (2, 2), (3, 4), 1)
  assert new.shape == (35 + 3, 2)
  np.testing.assert_allclose(new[:35], np.broadcast_to([[0.7, -1.1]], (35, 2)),
                             atol=1e-6)
  np.testing.assert_array_equal(new[35:], const[9:])
  attn["relative_position_bias"] = const
  _, out = fn({"params": params}, images)
  x = np.asarray(out["embeddings"], np.float64)
  bias = relative_bias_reference(new, 3, 4, 1)
  np.testing.assert_allclose(bias[:, 1:, 1:],
                             np.broadcast_to([[[0.7]], [[-1.1]]], (2, 12, 12)),
                             atol=1e-6)
  expected, _ = block(p, x, bias=bias)
  np.testing.assert_allclose(out["block0"], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------- training-mode behaviour


@pytest.fixture(scope="module")
def dropout_model():
  """Identical examples; dropout, attention dropout and drop path enabled."""
  shape = (16, 16, 16, 3)
  model = models.create("testing", image_size=16, dropout_rate=0.2,
                        attention_dropout_rate=0.2, stochastic_depth=0.5)
  params = random_params(model, shape)
  images = np.broadcast_to(random_images((1,) + shape[1:]), shape)
  labels = jax.nn.one_hot(np.arange(16) % 10, 10)

  def loss_fn(params, rng):
    logits, out = model.apply({"params": params}, images, train=True,
                              output_hidden_states=True, rngs={"dropout": rng})
    return losses.softmax_xent(logits, labels), out

  train_step = jit(jax.value_and_grad(loss_fn, has_aux=True))
  return model, params, np.ascontiguousarray(images), train_step


def test_dropout_and_drop_path_only_in_train_mode(dropout_model):
  model, params, images, train_step = dropout_model
  _, out = apply_fn(model, output_hidden_states=True)({"params": params},
                                                       images)
  p = to64(params)
  x, _ = block(p["Transformer"]["encoderblock_0"],
               np.asarray(out["embeddings"], np.float64))
  np.testing.assert_allclose(out["block0"], x, rtol=1e-4, atol=1e-4)

  (_, out1), _ = train_step(params, jax.random.PRNGKey(1))
  (_, out2), _ = train_step(params, jax.random.PRNGKey(2))
  assert not np.allclose(out1["block0"], out2["block0"])
  assert not np.allclose(out1["block0"], out["block0"])
  # Drop path is per sample: where both residual branches were dropped the
  # block leaves its input unchanged, elsewhere it does not.
  unchanged = np.all(np.asarray(out1["block0"]) ==
                     np.asarray(out1["embeddings"]), axis=(1, 2))
  assert 0 < unchanged.sum() < len(unchanged)


def test_gradients_finite(dropout_model):
  _, params, _, train_step = dropout_model
  (loss, _), g = train_step(params, jax.random.PRNGKey(0))
  assert np.isfinite(loss)
  leaves = jax.tree_util.tree_leaves(g)
  assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
  assert np.abs(g["head"]["kernel"]).sum() > 0
  mha = g["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  assert np.abs(mha["query"]["kernel"]).sum() > 0
  assert np.abs(g["Transformer"]["posembed_input"]["pos_embedding"]).sum() > 0

# ---------------------------------------------------------------- hybrid


def test_hybrid_forward_and_weight_standardization():
  shape = (BATCH, 16, 16, 3)
  model = models.create("testing", patch_size=1, image_size=16,
                        resnet=dict(num_layers=(1,), width_factor=0.5))
  params = random_params(model, shape)
  images = random_images(shape)
  fn = apply_fn(model)
  logits, out = fn({"params": params}, images)
  assert out["stem"].shape == (BATCH, 4, 4, 16)
  assert np.all(np.isfinite(logits))
  # StdConv standardizes each output filter: an affine change of a kernel
  # (per output channel) does not change the result.
  scaled = jax.tree_util.tree_map(lambda a: a, params)
  scaled["conv_root"] = {"kernel": params["conv_root"]["kernel"] * 3. + .5}
  scaled_logits, _ = fn({"params": scaled}, images)
  np.testing.assert_allclose(scaled_logits, logits, rtol=1e-4, atol=1e-4)
