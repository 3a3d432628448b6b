"""Tests for vit_jax.models: registry, parameter tree, counts, shapes, errors.

Everything here traces with `jax.eval_shape` (no compilation, no allocation)
except the attention tests, which compare the attention paths' outputs and
gradients on the tiny "testing" model; numerical checks of the forward pass
are in test_model_numerics.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import vit

RNG = {"params": jax.random.PRNGKey(0)}


def _images(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _param_shapes(model, shape=(1, 224, 224, 3)):
  variables = jax.eval_shape(model.init, RNG, _images(shape))
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


@functools.lru_cache(maxsize=None)
def _variant_shapes(name, overrides=()):
  return _param_shapes(models.create(name, **dict(overrides)))


def _count(shapes):
  return sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize("name,overrides,expected", [
    ("Ti/16", {}, 5_717_416),
    ("S/16", {}, 22_050_664),
    ("B/16", {}, 86_567_656),
    ("B/32", {}, 88_224_232),
    ("L/16", {}, 304_326_632),
    ("H/14", {}, 632_045_800),
    ("B/16", {"classifier": "gap"}, 86_566_120),
    # 197 x 768 learned positions -> (14 + 14) x 384 row and column ones.
    ("B/16", {"posemb": "learn2d"}, 86_567_656 - 197 * 768 + 28 * 384),
    # No absolute table; per block ((2 * 14 - 1) ** 2 + 3 cls entries) x 12
    # heads of relative position bias.
    ("B/16", {"posemb": "relative"},
     86_567_656 - 197 * 768 + 12 * ((2 * 14 - 1)**2 + 3) * 12),
    ("R50+B/16", {}, 98_659_112),
])
def test_parameter_counts(name, overrides, expected):
  shapes = _variant_shapes(name, tuple(sorted(overrides.items())))
  assert _count(shapes) == expected


def _design_doc_names(depth):
  """Parameter names of docs/design.md §3 (token pooling, no extras)."""
  names = ["cls", "embedding/kernel", "embedding/bias",
           "Transformer/posembed_input/pos_embedding",
           "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias",
           "head/kernel", "head/bias"]
  for i in range(depth):
    block = f"Transformer/encoderblock_{i}"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      names += [f"{block}/{ln}/scale", f"{block}/{ln}/bias"]
    for proj in ("query", "key", "value", "out"):
      names += [f"{block}/MultiHeadDotProductAttention_1/{proj}/kernel",
                f"{block}/MultiHeadDotProductAttention_1/{proj}/bias"]
    for dense in ("Dense_0", "Dense_1"):
      names += [f"{block}/MlpBlock_3/{dense}/kernel",
                f"{block}/MlpBlock_3/{dense}/bias"]
  return names


def test_b16_parameter_names_and_shapes_match_design():
  shapes = _variant_shapes("B/16")
  assert sorted(shapes) == sorted(_design_doc_names(12))
  d, h, m = 768, 12, 3072
  mha = "Transformer/encoderblock_3/MultiHeadDotProductAttention_1"
  assert shapes["cls"] == (1, 1, d)
  assert shapes["embedding/kernel"] == (16, 16, 3, d)
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, d)
  assert shapes[f"{mha}/query/kernel"] == (d, h, d // h)
  assert shapes[f"{mha}/value/bias"] == (h, d // h)
  assert shapes[f"{mha}/out/kernel"] == (h, d // h, d)
  assert shapes[f"{mha}/out/bias"] == (d,)
  assert shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == (
      d, m)
  assert shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"] == (
      m, d)
  assert shapes["head/kernel"] == (d, 1000)


def test_optional_parameters():
  base = dict(image_size=32)
  shapes = _param_shapes(
      models.create("testing", representation_size=12, use_mask_token=True,
                    **base), (1, 32, 32, 3))
  assert shapes["pre_logits/kernel"] == (16, 12)
  assert shapes["head/kernel"] == (12, 10)
  assert shapes["mask_token"] == (1, 1, 16)
  shapes = _param_shapes(models.create("testing", classifier="gap", **base),
                         (1, 32, 32, 3))
  assert "cls" not in shapes
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 16, 16)
  shapes = _param_shapes(models.create("testing", posemb="sincos2d", **base),
                         (1, 32, 32, 3))
  assert not any("posembed_input" in n for n in shapes)
  shapes = _param_shapes(models.create("testing", qkv_bias=False, **base),
                         (1, 32, 32, 3))
  mha = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
  assert f"{mha}/query/bias" not in shapes and f"{mha}/out/bias" in shapes
  shapes = _param_shapes(models.create("testing", num_classes=0, **base),
                         (1, 32, 32, 3))
  assert not any(n.startswith("head") for n in shapes)
  variables = jax.eval_shape(
      models.create("testing", param_dtype="bfloat16", **base).init, RNG,
      _images((1, 32, 32, 3)))
  assert all(v.dtype == jnp.bfloat16
             for v in jax.tree_util.tree_leaves(variables))
  shapes = _param_shapes(models.create("testing", decoder=True, **base),
                         (1, 32, 32, 3))
  assert shapes["decoder/kernel"] == (1, 1, 16, 8 * 8 * 3)
  assert shapes["mask_token"] == (1, 1, 16)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_learn2d_parameters(classifier):
  """Row [1, h, D/2] and column [1, w, D/2] tables replace the 1-D table."""
  kw = dict(image_size=(16, 24), patch_size=4, classifier=classifier)
  shape = (1, 16, 24, 3)  # A 4 x 6 grid.
  learn = _param_shapes(models.create("testing", **kw), shape)
  learn2d = _param_shapes(models.create("testing", posemb="learn2d", **kw),
                          shape)
  pe = "Transformer/posembed_input/pos_embedding"
  assert learn2d[pe + "_row"] == (1, 4, 8)
  assert learn2d[pe + "_col"] == (1, 6, 8)
  assert pe not in learn2d
  prefix = 1 if classifier == "token" else 0
  assert learn[pe] == (1, prefix + 24, 16)
  assert set(learn) - {pe} == set(learn2d) - {pe + "_row", pe + "_col"}
  assert _count(learn2d) == _count(learn) - (prefix + 4 * 6) * 16 + (4 + 6) * 8


def _relative_size(grid, classifier):
  """(2h - 1)(2w - 1) offsets, plus cls -> patch, patch -> cls, cls -> cls."""
  extra = 3 if classifier == "token" else 0
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + extra


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_relative_parameters(classifier):
  """Per-block [(2h - 1)(2w - 1) + extra, heads] tables replace the 1-D one."""
  kw = dict(image_size=(16, 24), patch_size=4, classifier=classifier)
  shape = (1, 16, 24, 3)  # A 4 x 6 grid.
  learn = _param_shapes(models.create("testing", **kw), shape)
  relative = _param_shapes(
      models.create("testing", posemb="relative", num_layers=2, **kw), shape)
  learn2 = _param_shapes(models.create("testing", num_layers=2, **kw), shape)
  pe = "Transformer/posembed_input/pos_embedding"
  size = _relative_size((4, 6), classifier)
  table = "MultiHeadDotProductAttention_1/relative_position_bias"
  for i in range(2):
    assert relative[f"Transformer/encoderblock_{i}/{table}"] == (size, 2)
  assert not any("posembed_input" in n for n in relative)
  added = {f"Transformer/encoderblock_{i}/{table}" for i in range(2)}
  assert set(learn2) - {pe} == set(relative) - added
  prefix = 1 if classifier == "token" else 0
  assert learn[pe] == (1, prefix + 24, 16)
  assert _count(relative) == _count(learn2) - (prefix + 24) * 16 + 2 * size * 2
  scanned = _param_shapes(models.create(
      "testing", posemb="relative", num_layers=2, scan=True, **kw), shape)
  assert scanned[f"Transformer/encoderblock/{table}"] == (2, size, 2)
  assert _count(scanned) == _count(relative)


def test_relative_parameter_count_of_the_testing_model():
  """The testing model (32 px, patch 8: a 4 x 4 grid) with gap pooling."""
  learn = _param_shapes(models.create("testing", classifier="gap"),
                        (1, 32, 32, 3))
  relative = _param_shapes(
      models.create("testing", classifier="gap", posemb="relative"),
      (1, 32, 32, 3))
  assert _count(relative) == _count(learn) - 16 * 16 + (7 * 7) * 2


def test_map_head_parameters():
  shapes = _param_shapes(models.create("testing", classifier="map"),
                         (1, 32, 32, 3))
  assert "cls" not in shapes
  assert shapes["MAPHead_0/probe"] == (1, 1, 16)
  assert shapes["MAPHead_0/MultiHeadDotProductAttention_0/query/kernel"] == (
      16, 2, 8)
  assert shapes["MAPHead_0/LayerNorm_0/scale"] == (16,)
  assert shapes["MAPHead_0/MlpBlock_0/Dense_0/kernel"] == (16, 32)


def test_scan_stacks_blocks_under_encoderblock():
  per_block = _param_shapes(models.create("testing", num_layers=3),
                            (1, 32, 32, 3))
  scanned = _param_shapes(models.create("testing", num_layers=3, scan=True),
                          (1, 32, 32, 3))
  prefix = "Transformer/encoderblock/"
  stacked = {n[len(prefix):]: s for n, s in scanned.items()
             if n.startswith(prefix)}
  block0 = "Transformer/encoderblock_0/"
  expected = {n[len(block0):]: (3,) + s for n, s in per_block.items()
              if n.startswith(block0)}
  assert stacked == expected
  others = {n for n in scanned if not n.startswith(prefix)}
  assert others == {n for n in per_block if "encoderblock_" not in n}


def test_hybrid_parameter_names():
  shapes = _variant_shapes("R50+B/16")
  assert shapes["conv_root/kernel"] == (7, 7, 3, 64)
  assert shapes["gn_root/scale"] == (64,)
  assert shapes["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
  assert shapes["block1/unit1/gn_proj/bias"] == (256,)
  assert shapes["block3/unit9/conv3/kernel"] == (1, 1, 256, 1024)
  assert shapes["block2/unit4/conv2/kernel"] == (3, 3, 128, 128)
  assert not any(n.startswith("block4") for n in shapes)
  assert shapes["embedding/kernel"] == (1, 1, 1024, 768)
  assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 197, 768)
  s32 = _variant_shapes("R26+S/32")
  assert s32["block4/unit2/conv3/kernel"] == (1, 1, 512, 2048)
  assert s32["Transformer/posembed_input/pos_embedding"] == (1, 50, 384)


def _shapes_out(model, shape, **kwargs):
  variables = jax.eval_shape(model.init, RNG, _images(shape))
  fn = lambda v, x: model.apply(v, x, **kwargs)
  return jax.eval_shape(fn, variables, _images(shape))


@pytest.mark.parametrize("patch,grid", [(16, (2, 3)), ((16, 8), (2, 6))])
def test_non_square_images_and_patches(patch, grid):
  model = models.create("testing", patch_size=patch, image_size=(32, 48))
  output, out = _shapes_out(model, (2, 32, 48, 3),
                            output_hidden_states=True)
  assert output.shape == (2, 10)
  assert out["stem"].shape == (2, *grid, 16)
  assert out["encoded"].shape == (2, 1 + grid[0] * grid[1], 16)


def test_single_channel_and_decoder_shapes():
  model = models.create("testing", num_channels=1, decoder=True,
                        image_size=(16, 24))
  output, out = _shapes_out(model, (2, 16, 24, 1))
  assert output.shape == (2, 16, 24, 1)
  assert out["reconstruction"].shape == (2, 16, 24, 1)
  assert out["logits"].shape == (2, 10)


def test_output_kinds():
  shape = (2, 32, 32, 3)
  output, out = _shapes_out(models.create("testing", num_classes=1), shape)
  assert output.shape == (2, 1)
  output, out = _shapes_out(
      models.create("testing", num_classes=0, representation_size=6), shape)
  assert output.shape == (2, 6) and "logits" not in out
  output, out = _shapes_out(models.create("testing", classifier="unpooled"),
                            shape)
  assert output.shape == (2, 16, 10)
  _, out = _shapes_out(models.create("testing", num_layers=2), shape,
                       output_attentions=True, output_hidden_states=True)
  assert out["block1"].shape == (2, 17, 16)
  assert out["block1/attention"].shape == (2, 2, 17, 17)
  assert out["embeddings"].shape == (2, 17, 16)


def test_hybrid_shapes():
  model = models.create("testing", resnet=dict(num_layers=(1, 1),
                                               width_factor=0.5),
                        patch_size=1, image_size=32)
  output, out = _shapes_out(model, (2, 32, 32, 3))
  assert out["stem"].shape == (2, 4, 4, 16)
  assert output.shape == (2, 10)


def test_registry():
  for name in ("testing", "Ti/16", "S/16", "S/32", "B/8", "B/16", "B/32",
               "L/16", "L/32", "H/14", "R50+B/16", "R26+S/32"):
    assert name in models.VARIANTS
    assert isinstance(models.create(name), models.VisionTransformer)
  config = models.get_config("B/16")
  assert (config["hidden_size"], config["num_layers"], config["num_heads"],
          config["mlp_dim"], config["patch_size"]) == (768, 12, 12, 3072, 16)
  config["hidden_size"] = 1
  assert models.get_config("B/16")["hidden_size"] == 768  # A copy.
  model = models.create("B/16", num_classes=7, image_size=(32, 48))
  assert model.num_classes == 7 and model.num_patches == 2 * 3


def test_modules_are_hashable_with_list_fields():
  # Configs loaded from JSON carry lists; the module must stay hashable to be
  # a static argument of jax.jit.
  a = models.create("R26+S/32", image_size=[64, 96], patch_size=[1, 1],
                    resnet={"num_layers": [2, 2, 2, 2], "width_factor": 1})
  b = models.create("R26+S/32", image_size=(64, 96), patch_size=(1, 1))
  assert a == b and hash(a) == hash(b)
  assert a.grid_size((64, 96)) == (2, 3)


def test_registry_errors():
  with pytest.raises(ValueError, match=r"unknown model variant 'B/7'.*B/16"):
    models.create("B/7")
  with pytest.raises(ValueError, match=r"unknown VisionTransformer field.*"
                     r"'hiden_size'.*hidden_size"):
    models.create("testing", hiden_size=32)
  with pytest.raises(ValueError, match="hidden_size 18 is not divisible by "
                     "num_heads 4"):
    models.create("testing", hidden_size=18, num_heads=4)
  with pytest.raises(ValueError, match="unknown classifier 'cls'"):
    models.create("testing", classifier="cls")
  with pytest.raises(ValueError, match="unknown posemb 'rope'.*'relative'"):
    models.create("testing", posemb="rope")
  with pytest.raises(ValueError, match=r"posemb='learn2d' needs an even "
                     r"hidden_size.*got 15"):
    models.create("testing", posemb="learn2d", hidden_size=15, num_heads=3)
  with pytest.raises(ValueError, match="unknown remat_policy 'all'"):
    models.create("testing", remat_policy="all")
  with pytest.raises(ValueError, match=r"decoder=True needs .* square"):
    models.create("testing", decoder=True, patch_size=(8, 4))


def test_input_errors():
  model = models.create("testing", patch_size=16, image_size=32)
  with pytest.raises(ValueError, match=r"image size \(30, 32\) is not "
                     r"divisible by patch size 16"):
    _shapes_out(model, (1, 30, 32, 3))
  model = models.create("testing", patch_size=(16, 8), image_size=32)
  with pytest.raises(ValueError, match=r"image size \(32, 36\) is not "
                     r"divisible by patch size \(16, 8\)"):
    jax.eval_shape(model.init, RNG, _images((1, 32, 36, 3)))
  model = models.create("testing")
  variables = jax.eval_shape(model.init, RNG, _images((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"image size \(48, 32\).*6x4.*"
                     r"image_size \(32, 32\).*interpolate_pos_encoding=True"):
    jax.eval_shape(model.apply, variables, _images((2, 48, 32, 3)))
  with pytest.raises(ValueError, match="use_mask_token=True"):
    jax.eval_shape(lambda v, x: model.apply(
        v, x, bool_masked_pos=jnp.zeros((2, 16), bool)), variables,
                   _images((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"head_mask must have shape"):
    jax.eval_shape(lambda v, x: model.apply(
        v, x, head_mask=jnp.ones((3,))), variables, _images((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
    jax.eval_shape(model.apply, variables, _images((32, 32, 3)))
  with pytest.raises(ValueError, match=r"images have 1 channels but the model "
                     r"has num_channels=3"):
    jax.eval_shape(model.apply, variables, _images((2, 32, 32, 1)))
  model = models.create("testing", use_mask_token=True)
  variables = jax.eval_shape(model.init, RNG, _images((2, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"bool_masked_pos must have shape "
                     r"\[batch, num_patches\] = \(2, 16\), got \(2, 15\)"):
    jax.eval_shape(lambda v, x: model.apply(
        v, x, bool_masked_pos=jnp.zeros((2, 15), bool)), variables,
                   _images((2, 32, 32, 3)))


def test_attention_impls_compute_the_same_function():
  """The einsum path and jax.nn.dot_product_attention ("xla") agree (with a
  relative bias and in the MAP head too), and "auto" (einsum on CPU) returns
  the weights when asked."""
  classifier, posemb = "map", "relative"
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  nets = {impl: models.create("testing", classifier=classifier, posemb=posemb,
                              attention_impl=impl)
          for impl in ("auto", "xla")}
  params = jax.jit(nets["auto"].init)(jax.random.PRNGKey(1), x)["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(  # non-zero relative tables, head and biases
      lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32),
      params)
  outs = {impl: jax.jit(functools.partial(net.apply, output_attentions=(
      impl == "auto")))({"params": params}, x) for impl, net in nets.items()}
  np.testing.assert_allclose(outs["xla"][0], outs["auto"][0], atol=1e-5)
  weights = outs["auto"][1]["block0/attention"]
  assert weights.shape == (2, 2, 16, 16)
  np.testing.assert_allclose(np.sum(weights, axis=-1), 1, atol=1e-5)


def _plain_attention(q, k, v, bias, scale):
  """The einsum / softmax attention core, differentiated by autodiff."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k)
  if bias is not None:
    logits = logits + bias
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, axis=-1), v)


@functools.lru_cache(maxsize=None)
def _core_vjps(with_bias):
  """Jitted (output, vjp) of the custom-VJP core and of the plain one."""
  def both(q, k, v, bias, d_out):
    return [(out, vjp(d_out)) for out, vjp in (
        jax.vjp(lambda *a: core(*a, 0.3), q, k, v, bias)
        for core in (vit.attention_core, _plain_attention))]
  return jax.jit(both)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_q", [5, 1])
def test_attention_core_gradient_matches_autodiff(with_bias, num_q):
  """The hand-written backward pass of attention_core (dV = Pᵀ dO, dS =
  P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), ...) equals autodiff of the plain path, for
  q, k, v and the bias; also with fewer queries than keys (the MAP head)."""
  rng = np.random.default_rng(0)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)

  q, d_out = normal(2, 3, num_q, 4), normal(2, 3, num_q, 4)
  k, v = normal(2, 3, 5, 4), normal(2, 3, 5, 4)
  bias = normal(1, 3, num_q, 5) if with_bias else None
  (out, grads), (want, want_grads) = _core_vjps(with_bias)(q, k, v, bias,
                                                           d_out)
  np.testing.assert_allclose(out, want, atol=1e-6)
  assert (grads[3] is None) == (not with_bias)
  for got, expected in zip(grads, want_grads):
    if expected is not None:
      np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("classifier,posemb", [
    ("token", "relative"), ("gap", "learn")])
def test_attention_custom_vjp_matches_the_weights_path(classifier, posemb):
  """Loss and gradients (every parameter: q / k / v / out kernels, the
  relative position bias table, ...; and the images) through the custom-VJP
  core equal those through the plain einsum / softmax path, which the model
  takes when it returns the attention weights: with a cls token (prefix)
  and the relative bias, and with neither."""
  net = models.create("testing", classifier=classifier, posemb=posemb)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params = jax.jit(net.init)(jax.random.PRNGKey(1), x)["params"]
  rng = np.random.default_rng(2)
  params = jax.tree.map(  # non-zero relative tables, head and biases
      lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)

  def loss(p, x, weights):
    logits = net.apply({"params": p}, x, output_attentions=weights)[0]
    return jnp.sum(jnp.sin(logits))

  def custom_and_plain(p, x):
    jaxpr = str(jax.make_jaxpr(functools.partial(loss, weights=False))(p, x))
    assert "custom_vjp" in jaxpr
    return [jax.value_and_grad(functools.partial(loss, weights=w),
                               argnums=(0, 1))(p, x) for w in (False, True)]

  (value, grads), (want, want_grads) = jax.jit(custom_and_plain)(params, x)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  flat = jax.tree_util.tree_flatten_with_path(want_grads)[0]
  names = {jax.tree_util.keystr(path) for path, _ in flat}
  if posemb == "relative":
    assert any("relative_position_bias" in n for n in names)
  for (path, expected), got in zip(flat, jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_attention_impl_errors():
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    models.create("testing", attention_impl="flash")
  net = models.create("testing", attention_impl="xla")
  with pytest.raises(ValueError, match="cannot return or modify the "
                     "attention weights"):
    jax.eval_shape(functools.partial(net.init, output_attentions=True),
                   jax.random.PRNGKey(0), x)
