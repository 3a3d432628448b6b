"""Tests for vit_jax.npz: layouts, round trips, big_vision import, errors."""

import ml_dtypes
import numpy as np
import pytest

from vit_jax import npz

D, H, M, DEPTH, K = 8, 2, 16, 3, 5


def _rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def original_tree(seed=0, cls=True, depth=DEPTH, grid=4):
  """A hand-made parameter tree in the original (our) layout."""
  rng = np.random.default_rng(seed)
  flat = {
      "embedding/kernel": _rand(rng, 4, 4, 3, D),
      "embedding/bias": _rand(rng, D),
      npz.POSEMB: _rand(rng, 1, grid + int(cls), D),
      "Transformer/encoder_norm/scale": _rand(rng, D),
      "Transformer/encoder_norm/bias": _rand(rng, D),
      "head/kernel": _rand(rng, D, K),
      "head/bias": _rand(rng, K),
  }
  if cls:
    flat["cls"] = _rand(rng, 1, 1, D)
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    a = b + "MultiHeadDotProductAttention_1/"
    for ln in ("LayerNorm_0", "LayerNorm_2"):
      flat[f"{b}{ln}/scale"] = _rand(rng, D)
      flat[f"{b}{ln}/bias"] = _rand(rng, D)
    for n in ("query", "key", "value"):
      flat[f"{a}{n}/kernel"] = _rand(rng, D, H, D // H)
      flat[f"{a}{n}/bias"] = _rand(rng, H, D // H)
    flat[f"{a}out/kernel"] = _rand(rng, H, D // H, D)
    flat[f"{a}out/bias"] = _rand(rng, D)
    flat[f"{b}MlpBlock_3/Dense_0/kernel"] = _rand(rng, D, M)
    flat[f"{b}MlpBlock_3/Dense_0/bias"] = _rand(rng, M)
    flat[f"{b}MlpBlock_3/Dense_1/kernel"] = _rand(rng, M, D)
    flat[f"{b}MlpBlock_3/Dense_1/bias"] = _rand(rng, D)
  return flat


def big_vision_layout(flat, prefix="params/", stacked=True):
  """Rewrites an original-layout tree the way big_vision stores it (docs/design.md §3).

  The cls position is folded into `cls` and dropped from the (top-level) table.
  """
  renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  out = {}
  posemb = flat[npz.POSEMB]
  if "cls" in flat:
    out["cls"] = flat["cls"] + posemb[:, :1]
    posemb = posemb[:, 1:]
  out["pos_embedding"] = posemb
  blocks = {}
  for k, v in flat.items():
    if k in ("cls", npz.POSEMB):
      continue
    if k.startswith("Transformer/encoderblock_"):
      _, block, module, rest = k.split("/", 3)
      i = int(block.rsplit("_", 1)[1])
      blocks.setdefault(f"{renames.get(module, module)}/{rest}", {})[i] = v
    else:
      out[k] = v
  for tail, by_index in blocks.items():
    if stacked:
      out[f"Transformer/encoderblock/{tail}"] = np.stack(
          [by_index[i] for i in sorted(by_index)])
    else:
      for i, v in by_index.items():
        out[f"Transformer/encoderblock_{i}/{tail}"] = v
  return {prefix + k: v for k, v in out.items()}


def _save_raw(path, flat):
  np.savez(path, **flat)
  return path


def _assert_same(a, b):
  a, b = npz.flatten(a), npz.flatten(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].shape == b[k].shape, k
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_flatten_unflatten_inverse():
  flat = original_tree()
  tree = npz.unflatten(flat)
  assert set(tree) == {"embedding", "Transformer", "head", "cls"}
  assert tree["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"].shape == (D, M)
  _assert_same(npz.flatten(tree), flat)


def test_stack_unstack_inverse():
  flat = original_tree()
  stacked = npz.stack_blocks(flat)
  assert not any(k.startswith("Transformer/encoderblock_") for k in stacked)
  k = "Transformer/encoderblock/MultiHeadDotProductAttention_1/query/kernel"
  assert stacked[k].shape == (DEPTH, D, H, D // H)
  np.testing.assert_array_equal(
      stacked[k][2], flat["Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel"])
  _assert_same(npz.unstack_blocks(stacked), flat)
  nested = npz.stack_blocks(npz.unflatten(flat))
  assert nested["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape == (DEPTH, D)


@pytest.mark.parametrize("cls", [True, False])
def test_original_layout_round_trip_is_exact(tmp_path, cls):
  flat = original_tree(cls=cls)
  src = _save_raw(tmp_path / "orig.npz", flat)
  loaded = npz.load_npz(src)
  _assert_same(loaded, flat)
  npz.save_npz(tmp_path / "again.npz", loaded)
  with np.load(tmp_path / "again.npz") as data:
    _assert_same({k: data[k] for k in data.files}, flat)


def test_save_npz_unstacks_and_writes_float32_for_bfloat16(tmp_path):
  flat = original_tree()
  stacked = npz.stack_blocks(npz.unflatten(flat))
  stacked["head"]["kernel"] = stacked["head"]["kernel"].astype(ml_dtypes.bfloat16)
  npz.save_npz(tmp_path / "s.npz", stacked)
  with np.load(tmp_path / "s.npz") as data:
    assert sorted(data.files) == sorted(flat)
    assert data["head/kernel"].dtype == np.float32
    np.testing.assert_array_equal(
        data["head/kernel"], flat["head/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("prefix,stacked,cls", [
    ("params/", True, True), ("", True, False), ("params/", False, False), ("", False, True)])
def test_big_vision_layout_maps_to_ours(tmp_path, prefix, stacked, cls):
  flat = original_tree(cls=cls)
  bv = big_vision_layout(flat, prefix=prefix, stacked=stacked)
  loaded = npz.flatten(npz.load_npz(_save_raw(tmp_path / "bv.npz", bv)))
  assert sorted(loaded) == sorted(flat)
  for k, v in flat.items():
    if k in ("cls", npz.POSEMB) and cls:
      continue
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  if cls:
    # The cls position is folded into `cls`; what the model adds up is unchanged.
    np.testing.assert_array_equal(loaded[npz.POSEMB][:, 0], 0)
    np.testing.assert_array_equal(loaded[npz.POSEMB][:, 1:], flat[npz.POSEMB][:, 1:])
    np.testing.assert_allclose(
        loaded["cls"] + loaded[npz.POSEMB][:, :1], flat["cls"] + flat[npz.POSEMB][:, :1])


def test_map_head_and_no_pos_cls_keys_pass_through(tmp_path):
  flat = original_tree(cls=False)
  rng = np.random.default_rng(1)
  m = "MAPHead_0/"
  flat[m + "probe"] = _rand(rng, 1, 1, D)
  flat[m + "MultiHeadDotProductAttention_0/query/kernel"] = _rand(rng, D, H, D // H)
  flat[m + "LayerNorm_0/scale"] = _rand(rng, D)
  flat[m + "MlpBlock_0/Dense_0/kernel"] = _rand(rng, D, M)
  bv = big_vision_layout(flat, stacked=True)
  loaded = npz.flatten(npz.load_npz(_save_raw(tmp_path / "map.npz", bv)))
  _assert_same(loaded, flat)


def test_unknown_key_is_an_error_naming_it(tmp_path):
  flat = original_tree()
  flat["Transformer/encoderblock_0/Adapter/kernel"] = np.zeros((3, 7), np.float32)
  with pytest.raises(ValueError, match=r"Adapter/kernel \(3, 7\)"):
    npz.load_npz(_save_raw(tmp_path / "x.npz", flat))


def test_target_mismatch_lists_keys_and_shapes(tmp_path):
  flat = original_tree()
  target = dict(flat)
  target["head/kernel"] = np.zeros((D, K + 1), np.float32)
  target["pre_logits/kernel"] = np.zeros((D, D), np.float32)
  del target["Transformer/encoder_norm/bias"]
  src = _save_raw(tmp_path / "t.npz", flat)
  with pytest.raises(ValueError) as err:
    npz.load_npz(src, target=npz.stack_blocks(target))
  msg = str(err.value)
  assert "missing from checkpoint" in msg and "pre_logits/kernel (8, 8)" in msg
  assert "unexpected in checkpoint" in msg and "Transformer/encoder_norm/bias (8,)" in msg
  assert "head/kernel" in msg and "(8, 5) vs model (8, 6)" in msg
  # A matching target passes, stacked or not.
  npz.load_npz(src, target=flat)
  npz.load_npz(src, target=npz.stack_blocks(flat))


def test_both_position_tables_is_an_error(tmp_path):
  flat = original_tree()
  flat["pos_embedding"] = flat[npz.POSEMB][:, 1:]
  with pytest.raises(ValueError, match="both `pos_embedding`"):
    npz.load_npz(_save_raw(tmp_path / "p.npz", flat))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_big_vision_file_gives_the_same_model_outputs(tmp_path, classifier):
  """A real model's parameters, written the way big_vision does, load to the same model."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("testing", hidden_size=16, num_layers=2, num_heads=2,
                        mlp_dim=32, patch_size=4, image_size=(8, 12),
                        classifier=classifier, num_classes=3)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, images))
  rng = np.random.default_rng(1)
  flat = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in npz.flatten(shapes["params"]).items()}
  path = _save_raw(tmp_path / "bv.npz", big_vision_layout(flat, prefix="params/"))
  loaded = npz.load_npz(path, target=shapes["params"])
  want, _ = model.apply({"params": npz.unflatten(flat)}, images)
  got, _ = model.apply({"params": loaded}, images)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Written back in the original layout, it stays the same tree.
  npz.save_npz(tmp_path / "orig.npz", loaded)
  _assert_same(npz.load_npz(tmp_path / "orig.npz"), loaded)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_learn2d_tree_round_trips_and_is_inferred(tmp_path, classifier):
  """Row / column position tables (posemb="learn2d") are known names; their shapes
  give the (non-square) grid."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import infer  # pylint: disable=g-import-not-at-top
  model = models.create("testing", patch_size=4, image_size=(16, 24),
                        classifier=classifier, posemb="learn2d")
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)}, np.zeros((1, 16, 24, 3), np.float32)))
  rng = np.random.default_rng(0)
  flat = {k: _rand(rng, *v.shape) for k, v in npz.flatten(shapes["params"]).items()}
  assert flat[npz.POSEMB_ROW].shape == (1, 4, 8)
  assert flat[npz.POSEMB_COL].shape == (1, 6, 8)
  assert npz.POSEMB not in flat
  npz.save_npz(tmp_path / "l2d.npz", npz.unflatten(flat))
  loaded = npz.load_npz(tmp_path / "l2d.npz", target=shapes["params"])
  _assert_same(loaded, flat)
  cfg = infer.model_config(loaded)
  assert cfg["posemb"] == "learn2d" and cfg["image_size"] == (16, 24)
  assert cfg["classifier"] == classifier and cfg["hidden_size"] == 16
  assert infer.model_config(loaded, image_size=(16, 24))["image_size"] == (16, 24)
  with pytest.raises(ValueError, match="4x6 grid .* gives 4x4"):
    infer.model_config(loaded, image_size=16)
  del flat[npz.POSEMB_COL]
  with pytest.raises(ValueError, match="only one of"):
    infer.model_config(flat)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_relative_tree_round_trips_and_is_inferred(tmp_path, classifier):
  """Per-block relative position tables (posemb="relative") are known names, also
  stacked; their size gives a square grid, a non-square one needs the image size."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import infer  # pylint: disable=g-import-not-at-top
  extra = 3 if classifier == "token" else 0
  for image_size, grid in ((16, (4, 4)), ((16, 24), (4, 6))):
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    model = models.create("testing", patch_size=4, image_size=image_size,
                          num_layers=2, classifier=classifier, posemb="relative")
    shapes = jax.eval_shape(lambda m=model, h=h, w=w: m.init(
        {"params": jax.random.PRNGKey(0)}, np.zeros((1, h, w, 3), np.float32)))
    rng = np.random.default_rng(0)
    flat = {k: _rand(rng, *v.shape) for k, v in npz.flatten(shapes["params"]).items()}
    key = "Transformer/encoderblock_1/" + npz.RELATIVE_BIAS
    size = (2 * grid[0] - 1) * (2 * grid[1] - 1) + extra
    assert flat[key].shape == (size, 2)
    assert not any("posembed_input" in k for k in flat)
    npz.save_npz(tmp_path / "rel.npz", npz.stack_blocks(npz.unflatten(flat)))
    loaded = npz.load_npz(tmp_path / "rel.npz", target=shapes["params"])
    _assert_same(loaded, flat)
    square = isinstance(image_size, int)  # Inferred; else given.
    cfg = infer.model_config(loaded, image_size=None if square else image_size)
    assert cfg["posemb"] == "relative" and cfg["image_size"] == image_size
    assert cfg["classifier"] == classifier and cfg["num_layers"] == 2
  with pytest.raises(ValueError, match=r"relative position tables of "
                     f"{77 + extra} rows, not .* square grid: pass --image_size"):
    infer.model_config(loaded)
  with pytest.raises(ValueError, match=r"image size \(16, 16\) .* gives a 4x4 grid"):
    infer.model_config(loaded, image_size=16)


@pytest.mark.parametrize("posemb_kind", ["learn2d", "relative"])
def test_learned_2d_and_relative_npz_load_for_fewshot_and_analyze(tmp_path,
                                                                  posemb_kind):
  """`--init=FILE.npz --model=...` (few-shot, analyze) reads the kind and grid
  off the row/column or relative tables: no --override needed. A BiT model
  has no .npz layout: one Error pointing to its workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import errors  # pylint: disable=g-import-not-at-top
  from vit_jax import model_source  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create("testing", posemb=posemb_kind)
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)}, np.zeros((1, 32, 32, 3), np.float32)))
  rng = np.random.default_rng(0)
  flat = {k: _rand(rng, *v.shape) for k, v in npz.flatten(shapes["params"]).items()}
  npz.save_npz(tmp_path / "m.npz", npz.unflatten(flat))
  params, loaded = model_source.load_npz_model(str(tmp_path / "m.npz"), "testing")
  assert loaded.posemb == posemb_kind and loaded.grid_size(loaded.image_size) == (4, 4)
  _assert_same(params, flat)
  with pytest.raises(errors.Error, match="BiT ResNet, which has no .npz layout"):
    model_source.load_npz_model(str(tmp_path / "m.npz"), "BiT-R50x1")
