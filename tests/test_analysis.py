"""vit_jax.analysis (hand-computed cases) and `python -m vit_jax.analyze`."""

import json
import math
import os

import jax
import numpy as np
import PIL.Image
import pytest

from vit_jax import analyze
from vit_jax import data
from vit_jax import errors
from vit_jax import models
from vit_jax import npz
from vit_jax import posemb
from vit_jax.analysis import attention_distance
from vit_jax.analysis import filters
from vit_jax.analysis import posemb_similarity
from vit_jax.analysis import rollout

from test_cli_errors import one_error_line  # pylint: disable=g-bad-import-order

# Attention distance.


def _with_cls(patch_rows, cls_share=0.5, cls_row=None):
  """[N, N] patch attention -> [1 + N, 1 + N] with a cls token.

  Every patch query gives `cls_share` of its mass to the cls key (dropped and
  renormalised away by the analysis); the cls query's row is `cls_row`.
  """
  n = patch_rows.shape[0]
  a = np.zeros((n + 1, n + 1))
  a[1:, 0] = cls_share
  a[1:, 1:] = (1 - cls_share) * patch_rows
  a[0] = cls_row if cls_row is not None else np.eye(n + 1)[n]
  return a


def test_distance_one_known_patch_2x2():
  # Grid 2x2, patch size 4: centres (2, 2), (2, 6), (6, 2), (6, 6).
  horizontal = np.eye(4)[[1, 0, 3, 2]]  # 0<->1, 2<->3: 4 px apart.
  diagonal = np.eye(4)[[3, 2, 1, 0]]    # 0<->3, 1<->2: 4*sqrt(2) px apart.
  layer = np.stack([_with_cls(horizontal), _with_cls(diagonal)])[None]
  got = attention_distance.mean_attention_distance(
      [layer], grid=2, patch_size=4, num_prefix_tokens=1)
  assert got.shape == (1, 2)
  np.testing.assert_allclose(got, [[4.0, 4 * math.sqrt(2)]], rtol=1e-6)


def test_distance_uniform_2x2_with_cls():
  # Uniform over cls + 4 patches; over the patches each query sees distances
  # 0, 4, 4, 4*sqrt(2): mean (8 + 4*sqrt(2)) / 4 = 2 + sqrt(2).
  layer = np.full((3, 1, 5, 5), 0.2)  # 3 images, 1 head.
  got = attention_distance.mean_attention_distance(
      [layer, layer], grid=(2, 2), patch_size=(4, 4), num_prefix_tokens=1)
  np.testing.assert_allclose(got, [[2 + math.sqrt(2)]] * 2, rtol=1e-6)


def test_distance_non_square_grid_and_patch():
  # Grid 2 x 3 (h, w), patch 2 px high and 5 px wide.
  grid, patch = (2, 3), (2, 5)
  # Uniform: over the 36 ordered pairs, (|drow|, |dcol|) counts
  # (0,0) 6, (0,1) 8, (0,2) 4, (1,0) 6, (1,1) 8, (1,2) 4 at distances
  # 0, 5, 10, 2, sqrt(29), sqrt(104): mean (23 + 2 sqrt(29) + 2 sqrt(26)) / 9.
  uniform = np.full((1, 1, 6, 6), 1 / 6)
  expect = (23 + 2 * math.sqrt(29) + 2 * math.sqrt(26)) / 9
  # Right neighbour (the last column looks left): 5 px; the row below (the
  # bottom row looks up): 2 px.
  right = np.eye(6)[[1, 2, 1, 4, 5, 4]]
  below = np.eye(6)[[3, 4, 5, 0, 1, 2]]
  layer = np.stack([uniform[0, 0], right, below])[None]
  got = attention_distance.mean_attention_distance([layer], grid, patch)
  np.testing.assert_allclose(got, [[expect, 5.0, 2.0]], rtol=1e-6)
  np.testing.assert_allclose(
      attention_distance.patch_distances(grid, patch).mean(), expect)


def test_distance_mask_and_stacked_layers():
  near = np.eye(4)[[1, 0, 3, 2]]
  far = np.eye(4)[[3, 2, 1, 0]]
  layers = np.stack([np.stack([near, far])[:, None],     # layer 1
                     np.stack([far, far])[:, None]])     # layer 2
  # [L=2, B=2, H=1, 4, 4]; the second image is padding.
  got = attention_distance.mean_attention_distance(
      layers, grid=2, patch_size=4, mask=np.array([True, False]))
  np.testing.assert_allclose(got, [[4.0], [4 * math.sqrt(2)]], rtol=1e-6)
  with pytest.raises(ValueError, match="prefix"):
    attention_distance.mean_attention_distance(layers, 2, 4,
                                               num_prefix_tokens=1)


# Position-embedding similarity.


def test_posemb_similarity_matches_numpy():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(1, 1 + 3 * 4, 8))
  sim = posemb_similarity.cosine_similarity(table, (3, 4), num_prefix_tokens=1)
  assert sim.shape == (3, 4, 3, 4)
  flat = sim.reshape(12, 12)
  np.testing.assert_allclose(np.diag(flat), 1.0, rtol=1e-12)
  np.testing.assert_allclose(flat, flat.T, rtol=1e-12)
  x = table[0, 1:]
  for i in range(12):
    for j in range(12):
      cos = x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j]))
      np.testing.assert_allclose(flat[i, j], cos, rtol=1e-10, atol=1e-12)


def test_posemb_tables_of_models():
  learned = models.create("testing", patch_size=4, image_size=(8, 12),
                          hidden_size=16)
  params = {"Transformer": {"posembed_input": {"pos_embedding": np.arange(
      (1 + 6) * 16, dtype=np.float32).reshape(1, 7, 16)}}}
  table, kind = posemb_similarity.position_table(params, learned)
  assert kind == "learned" and table.shape == (6, 16)
  np.testing.assert_array_equal(table, params["Transformer"]["posembed_input"]
                                ["pos_embedding"][0, 1:])
  fixed = learned.clone(posemb="sincos2d")
  table, kind = posemb_similarity.position_table({}, fixed)
  np.testing.assert_array_equal(table, posemb.sincos2d(2, 3, 16)[0])
  row = np.arange(2 * 8, dtype=np.float32).reshape(1, 2, 8)
  col = -np.arange(3 * 8, dtype=np.float32).reshape(1, 3, 8)
  table, kind = posemb_similarity.position_table(
      {"Transformer": {"posembed_input": {"pos_embedding_row": row,
                                          "pos_embedding_col": col}}},
      learned.clone(posemb="learn2d"))
  assert kind.startswith("learned 2-D") and table.shape == (6, 16)
  np.testing.assert_array_equal(table[4], np.concatenate([row[0, 1],
                                                          col[0, 1]]))
  with pytest.raises(ValueError, match="no position embeddings"):
    posemb_similarity.position_table({}, learned.clone(posemb="none"))


# Rollout.


def test_rollout_identity_and_uniform():
  t = 1 + 4  # cls + 2x2 patches
  identity = np.broadcast_to(np.eye(t), (2, 3, t, t))  # 2 images, 3 heads
  joint = rollout.rollout([identity])
  np.testing.assert_allclose(joint, np.broadcast_to(np.eye(t), (2, t, t)),
                             atol=1e-7)
  np.testing.assert_allclose(rollout.rollout_map([identity], 2, 1), 0.0,
                             atol=1e-7)
  # Uniform: (1/T + I) / 2, so the cls row gives each patch 1 / (2T).
  uniform = np.full((1, 2, t, t), 1 / t)
  np.testing.assert_allclose(rollout.rollout_map([uniform], 2, 1),
                             np.full((1, 2, 2), 1 / (2 * t)), rtol=1e-6)
  # Without a cls token: the mean of the patch rows, 1/(2N) + 1/(2N) = 1/N.
  uniform = np.full((1, 1, 4, 4), 1 / 4)
  np.testing.assert_allclose(rollout.rollout_map([uniform], 2, 0),
                             np.full((1, 2, 2), 1 / 4), rtol=1e-6)


def test_rollout_two_layers_in_order():
  # Tokens: cls, patch 1, patch 2. Layer a: everyone attends to patch 1;
  # layer b: to patch 2. R_a = (A_a + I) / 2, R_b likewise. The first layer
  # acts first: rollout = R_b @ R_a, whose cls row is
  # 0.5 * R_a[cls] + 0.5 * R_a[patch 2] = [.25, .5, .25].
  to_p1 = np.tile(np.eye(3)[1], (3, 1))
  to_p2 = np.tile(np.eye(3)[2], (3, 1))
  # Layer a as the mean of two heads that differ.
  layer_a = np.stack([to_p1 + (np.eye(3) - to_p1) * 0.5,
                      to_p1 - (np.eye(3) - to_p1) * 0.5])[None]
  np.testing.assert_allclose(layer_a.mean(axis=1)[0], to_p1)
  layer_b = to_p2[None, None]
  np.testing.assert_allclose(rollout.rollout([layer_a, layer_b])[0, 0],
                             [.25, .5, .25], rtol=1e-6)
  np.testing.assert_allclose(rollout.rollout_map([layer_a, layer_b], (1, 2)),
                             [[[.5, .25]]], rtol=1e-6)
  np.testing.assert_allclose(rollout.rollout_map([layer_b, layer_a], (1, 2)),
                             [[[.25, .5]]], rtol=1e-6)
  big = rollout.upsample(np.array([[[1., 1.], [1., 1.]]]), (8, 6))
  np.testing.assert_allclose(big, np.ones((1, 8, 6)), rtol=1e-6)


# Filters.


def test_filters_pca_matches_svd():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 2, 3, 40))  # non-square patch, RGB, 40 filters
  components, explained = filters.principal_components(kernel, k=5)
  assert components.shape == (5, 3, 2, 3) and explained.shape == (5,)
  x = kernel.reshape(18, 40)
  x = x - x.mean(axis=1, keepdims=True)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  for i in range(5):
    c = components[i].reshape(-1)
    assert min(np.abs(c - u[:, i]).max(), np.abs(c + u[:, i]).max()) < 1e-10
  np.testing.assert_allclose(explained, (s**2 / (s**2).sum())[:5])
  # The principal directions are those of the filters' covariance.
  cov = x @ x.T / 40
  w = np.linalg.eigvalsh(cov)[::-1]
  np.testing.assert_allclose(explained, (w / w.sum())[:5], rtol=1e-8)
  everything, _ = filters.principal_components(kernel, k=100)
  assert everything.shape[0] == 18


# The command line.

TINY = dict(patch_size=4, image_size=16, num_channels=1, num_classes=10,
            num_layers=2)


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
  """A random .npz of the tiny model (shapes from `init`, without compiling)."""
  model = models.create("testing", **TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 1), np.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(scale=0.3, size=s.shape).astype(np.float32),
      shapes["params"])
  path = str(tmp_path_factory.mktemp("npz") / "tiny.npz")
  npz.save_npz(path, params)
  return path


def test_cli_end_to_end(tiny_npz, tmp_path, capsys):
  out = str(tmp_path / "out")
  rc = analyze.run(["analyze", f"--init={tiny_npz}", "--model=testing",
                    "--dataset=digits", "--split=test", "--image_size=16",
                    "--num_images=12", "--num_show=3", "--batch_size=8",
                    f"--output_dir={out}"])
  printed = capsys.readouterr()
  assert rc == 0, printed.err
  for name in ("attention_distance.png", "posemb_similarity.png",
               "rollout.png", "filters.png"):
    with PIL.Image.open(os.path.join(out, name)) as img:
      assert min(img.size) > 100
  with open(os.path.join(out, "attention_distance.json")) as f:
    record = json.load(f)
  distances = np.array(record["mean_attention_distance"])
  assert distances.shape == (2, 2)  # [layers][heads]
  assert record["num_images"] == 12 and record["grid"] == [4, 4]
  # By hand: the model's attention on the first 12 test digits, cls token
  # dropped, each query's row over the 16 patches renormalised, weighted by
  # the distance between patch centres (4 px apart), averaged over queries.
  model = models.create("testing", **TINY)
  assert model.num_prefix_tokens == 1
  images = next(data.eval_batches(data.get_source("digits", "test"), 12,
                                  (16, 16)))["image"]
  _, out = model.apply({"params": npz.load_npz(tiny_npz)}, images,
                       train=False, output_attentions=True)
  centres = [((i + 0.5) * 4, (j + 0.5) * 4) for i in range(4) for j in range(4)]
  want = np.zeros((2, 2))
  for layer in range(2):
    weights = np.asarray(out[f"block{layer}/attention"], np.float64)
    for head in range(2):
      total = 0.0
      for image in range(12):
        for q in range(16):
          row = weights[image, head, 1 + q, 1:]
          total += sum(row[k] / row.sum() * math.dist(centres[q], centres[k])
                       for k in range(16))
      want[layer, head] = total / (12 * 16)
  np.testing.assert_allclose(distances, want, rtol=1e-5)
  assert "layer 1 mean" in printed.out and "layer 2 mean" in printed.out
  print(printed.out)  # The summary, for `pytest -s`.


def test_cli_bad_input(tiny_npz, tmp_path, capfd):
  line = one_error_line(analyze.run(
      ["analyze", f"--init={tiny_npz}", "--model=testing", "--what=distance,x",
       f"--output_dir={tmp_path}"]), capfd)
  assert "'x'" in line and "distance,posemb,rollout,filters" in line
  line = one_error_line(analyze.run(
      ["analyze", f"--workdir={tmp_path}/missing"]), capfd)
  assert "does not exist" in line
  no_posemb = str(tmp_path / "none.npz")  # As saved with posemb="none".
  with np.load(tiny_npz) as f:
    np.savez(no_posemb, **{k: f[k] for k in f.files if "posembed" not in k})
  line = one_error_line(analyze.run(
      ["analyze", f"--init={no_posemb}", "--model=testing",
       f"--output_dir={tmp_path}"]), capfd)
  assert "--override=posemb=" in line
  line = one_error_line(analyze.run(
      ["analyze", f"--init={no_posemb}", "--model=testing",
       "--override=posemb=none", "--override=image_size=16", "--what=posemb",
       f"--output_dir={tmp_path}"]), capfd)
  assert "no position embeddings" in line


def test_images_default_to_the_runs_dataset(tmp_path):
  """Distance and rollout images come from the workdir run's dataset."""
  from vit_jax import analyze  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text('{"dataset": "digits_canvas"}')
  assert analyze._run_dataset(str(tmp_path), None) == ("digits_canvas", None)  # pylint: disable=protected-access
  assert analyze._run_dataset(str(tmp_path), "x.npz") == ("digits", None)  # pylint: disable=protected-access
  assert analyze._run_dataset(None, None) == ("digits", None)  # pylint: disable=protected-access
  # With the training classes the run kept: folder splits map to them.
  (tmp_path / "config.json").write_text(
      '{"dataset": "folder:/d", "resolved": {"class_names": ["a", "b"]}}')
  assert analyze._run_dataset(str(tmp_path), None) == ("folder:/d", ["a", "b"])  # pylint: disable=protected-access


@pytest.mark.parametrize("posemb", ["none", "relative"])
def test_posemb_similarity_is_skipped_without_a_table(posemb):
  """No table on the tokens: the analysis is skipped with the reason, and
  asked for by name it is a one-line error naming the kind."""
  from vit_jax import analyze  # pylint: disable=g-import-not-at-top
  model = models.create("testing", posemb=posemb)
  todo, reasons = analyze.applicable(model)
  assert "posemb" not in todo and f"posemb='{posemb}'" in reasons["posemb"]
  with pytest.raises(errors.Error, match=f"posemb='{posemb}'"):
    analyze.applicable(model, ["posemb"])
