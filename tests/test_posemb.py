"""Tests for vit_jax.posemb: fixed tables, resampling vs torch and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import posemb


def test_sincos2d_matches_formula():
  h, w, dim = 3, 5, 16
  table = posemb.sincos2d(h, w, dim)
  assert table.shape == (1, h * w, dim) and table.dtype == np.float32
  q = dim // 4
  for y, x, d in [(0, 0, 0), (1, 4, 2), (2, 3, 3), (2, 1, 1)]:
    omega = 1. / 10_000.**(d / (q - 1))
    row = table[0, y * w + x]
    np.testing.assert_allclose(row[d], np.sin(x * omega), atol=1e-6)
    np.testing.assert_allclose(row[q + d], np.cos(x * omega), atol=1e-6)
    np.testing.assert_allclose(row[2 * q + d], np.sin(y * omega), atol=1e-6)
    np.testing.assert_allclose(row[3 * q + d], np.cos(y * omega), atol=1e-6)


def test_sincos2d_needs_width_multiple_of_4():
  with pytest.raises(ValueError, match="divisible by 4"):
    posemb.sincos2d(2, 2, 18)


def test_sincos1d_matches_transformer_formula():
  n, dim = 7, 10
  table = posemb.sincos1d(n, dim)
  assert table.shape == (1, n, dim)
  for p in range(n):
    for i in range(dim // 2):
      angle = p / 10_000.**(2 * i / dim)
      np.testing.assert_allclose(table[0, p, 2 * i], np.sin(angle), atol=1e-6)
      np.testing.assert_allclose(table[0, p, 2 * i + 1], np.cos(angle),
                                 atol=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("sizes", [(4, 4), (4, 7), (7, 3), (1, 3)])
def test_interpolation_matrix_partition_of_unity(method, sizes):
  mat = posemb.interpolation_matrix(*sizes, method)
  assert mat.shape == (sizes[1], sizes[0])
  np.testing.assert_allclose(mat.sum(axis=1), 1., atol=1e-6)


def test_interpolation_matrix_identity_at_same_size():
  for method in ("bilinear", "bicubic"):
    np.testing.assert_allclose(posemb.interpolation_matrix(5, 5, method),
                               np.eye(5), atol=1e-7)


def test_bilinear_upsample_by_hand():
  # 2 -> 4: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25.
  a, b = 1., 3.
  expected = [a, .75 * a + .25 * b, .25 * a + .75 * b, b]
  mat = posemb.interpolation_matrix(2, 4, "bilinear")
  np.testing.assert_allclose(mat @ np.array([a, b]), expected, atol=1e-6)


def test_bicubic_downsample_by_hand():
  # 4 -> 2: source coordinates 0.5 and 2.5, t = 0.5, A = -0.75 taps are
  # [-3/32, 19/32, 19/32, -3/32]; tap -1 is clamped to 0, tap 4 to 3.
  v = np.array([1., -2., 5., 3.])
  c = np.array([-3., 19., 19., -3.]) / 32
  expected = [c @ v[[0, 0, 1, 2]], c @ v[[1, 2, 3, 3]]]
  mat = posemb.interpolation_matrix(4, 2, "bicubic")
  np.testing.assert_allclose(mat @ v, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["zoom", "bilinear", "bicubic"])
def test_resample_constant_field_and_prefix(method):
  rng = np.random.default_rng(0)
  dim = 3
  prefix = rng.normal(size=(1, 1, dim)).astype(np.float32)
  value = rng.normal(size=(dim,)).astype(np.float32)
  grid = np.broadcast_to(value, (1, 2 * 3, dim))
  pe = np.concatenate([prefix, grid], axis=1)
  new = posemb.resample(pe, (2, 3), (5, 4), num_prefix_tokens=1,
                        method=method)
  assert new.shape == (1, 1 + 5 * 4, dim)
  np.testing.assert_array_equal(new[:, :1], prefix)
  np.testing.assert_allclose(new[0, 1:], np.broadcast_to(value, (20, dim)),
                             atol=1e-5)


def _linear_align_corners(grid, axis, size):
  """Linear interpolation along `axis` onto `size` points, output point o at
  input coordinate o * (n - 1) / (size - 1) (the end points meet)."""
  n = grid.shape[axis]
  src = np.arange(size) * (n - 1) / (size - 1)
  moved = np.moveaxis(grid, axis, -1)
  out = np.apply_along_axis(lambda v: np.interp(src, np.arange(n), v), -1,
                            moved)
  return np.moveaxis(out, -1, axis)


def test_resample_zoom_by_hand():
  # The published ViT code's resampling (scipy.ndimage.zoom, order=1): a
  # 2x2 grid onto 3x3 puts the corners at the corners, means in between.
  pe = np.float32([[[9.], [0.], [1.], [2.], [3.]]])
  new = posemb.resample(pe, (2, 2), (3, 3), num_prefix_tokens=1,
                        method="zoom")
  np.testing.assert_allclose(new[0, :, 0], [9., 0., .5, 1., 1., 1.5, 2., 2.,
                                            2.5, 3.], atol=1e-6)


def test_resample_zoom_non_square_by_hand():
  rng = np.random.default_rng(1)
  pe = rng.normal(size=(1, 2 + 3 * 4, 5)).astype(np.float32)
  new = posemb.resample(pe, (3, 4), (6, 5), num_prefix_tokens=2,
                        method="zoom")
  grid = pe[0, 2:].reshape(3, 4, 5).astype(np.float64)
  expected = _linear_align_corners(_linear_align_corners(grid, 0, 6), 1, 5)
  np.testing.assert_array_equal(new[:, :2], pe[:, :2])
  np.testing.assert_allclose(new[0, 2:], expected.reshape(30, 5), atol=1e-5)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
@pytest.mark.parametrize("old,new,prefix", [
    ((4, 4), (6, 6), 1), ((3, 5), (7, 4), 0), ((6, 4), (3, 2), 1),
    ((2, 3), (5, 9), 0)])
def test_resample_matches_torch_interpolate(method, old, new, prefix):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(2)
  dim = 6
  pe = rng.normal(size=(1, prefix + old[0] * old[1], dim)).astype(np.float32)
  got = posemb.resample(pe, old, new, num_prefix_tokens=prefix, method=method)
  grid = torch.from_numpy(pe[:, prefix:]).reshape(1, *old, dim)
  ref = torch.nn.functional.interpolate(
      grid.permute(0, 3, 1, 2), size=new, mode=method, align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()
  np.testing.assert_allclose(got[:, prefix:], ref, atol=2e-6, rtol=0)
  np.testing.assert_array_equal(got[:, :prefix], pe[:, :prefix])


def test_resample_under_jit_equals_numpy():
  rng = np.random.default_rng(3)
  pe = rng.normal(size=(1, 1 + 3 * 3, 4)).astype(np.float32)
  fn = jax.jit(lambda p: posemb.resample(p, (3, 3), (5, 2), 1, "bicubic"))
  got = fn(jnp.asarray(pe))
  assert isinstance(got, jax.Array)
  np.testing.assert_allclose(
      np.asarray(got), posemb.resample(pe, (3, 3), (5, 2), 1, "bicubic"),
      atol=1e-6)


def test_resample_errors():
  pe = np.zeros((1, 10, 4), np.float32)
  with pytest.raises(ValueError, match="10 positions, expected 17"):
    posemb.resample(pe, (4, 4), (2, 2), num_prefix_tokens=1)
  with pytest.raises(ValueError, match="unknown resample method 'nearest'"):
    posemb.resample(pe, (3, 3), (2, 2), num_prefix_tokens=1, method="nearest")


@pytest.mark.parametrize("grid,prefix", [((2, 3), 1), ((3, 2), 0), ((4, 4), 1)])
def test_relative_position_index_matches_beit(grid, prefix):
  """BEiT's construction: coords [2, N], relative coords shifted and scaled."""
  torch = pytest.importorskip("torch")
  h, w = grid
  coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w),
                                      indexing="ij")).flatten(1)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
  rel[:, :, 0] += h - 1
  rel[:, :, 1] += w - 1
  rel[:, :, 0] *= 2 * w - 1
  n = (2 * h - 1) * (2 * w - 1)
  expected = torch.zeros((prefix + h * w,) * 2, dtype=torch.long)
  expected[prefix:, prefix:] = rel.sum(-1)
  if prefix:
    expected[0, 0:] = n
    expected[0:, 0] = n + 1
    expected[0, 0] = n + 2
  got = posemb.relative_position_index(grid, prefix)
  np.testing.assert_array_equal(got, expected.numpy())
  assert posemb.relative_table_size(grid, prefix) == n + 3 * prefix
  assert got.max() == posemb.relative_table_size(grid, prefix) - 1


@pytest.mark.parametrize("old,new,prefix", [((2, 2), (3, 4), 1),
                                            ((4, 3), (2, 5), 0)])
def test_resample_relative_matches_torch_bilinear_per_head(old, new, prefix):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(4)
  heads, extra = 3, 3 * prefix
  n = (2 * old[0] - 1) * (2 * old[1] - 1)
  table = rng.normal(size=(2, n + extra, heads)).astype(np.float32)  # 2 layers
  got = posemb.resample_relative(table, old, new, prefix)
  new_n = (2 * new[0] - 1) * (2 * new[1] - 1)
  assert got.shape == (2, new_n + extra, heads)
  offsets = torch.from_numpy(table[:, :n]).reshape(
      2, 2 * old[0] - 1, 2 * old[1] - 1, heads).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(
      offsets, size=(2 * new[0] - 1, 2 * new[1] - 1), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).reshape(2, new_n, heads)
  np.testing.assert_allclose(got[:, :new_n], ref.numpy(), atol=2e-6, rtol=0)
  np.testing.assert_array_equal(got[:, new_n:], table[:, n:])
  under_jit = jax.jit(lambda t: posemb.resample_relative(t, old, new, prefix))
  np.testing.assert_allclose(np.asarray(under_jit(jnp.asarray(table))), got,
                             atol=1e-6)


def test_resample_relative_constant_and_errors():
  table = np.concatenate([np.full((9, 2), 0.5, np.float32),
                          np.float32([[1, 2], [3, 4], [5, 6]])])
  new = posemb.resample_relative(table, (2, 2), (5, 3), 1)
  np.testing.assert_allclose(new[:-3], 0.5, atol=1e-6)
  np.testing.assert_array_equal(new[-3:], table[-3:])
  same = posemb.resample_relative(table, (2, 2), (2, 2), 1)
  np.testing.assert_allclose(same, table, atol=1e-6)
  with pytest.raises(ValueError, match=r"shape \(12, 2\), expected \[..., 9, "
                     r"heads\] for a 2x2 grid"):
    posemb.resample_relative(table, (2, 2), (3, 3), 0)
  with pytest.raises(ValueError, match="0 or 1 prefix"):
    posemb.relative_position_index((2, 2), 2)
