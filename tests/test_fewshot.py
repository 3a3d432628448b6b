"""Few-shot evaluator: sampling, sharded features, report, short classes."""

import os
import re

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
from sklearn import linear_model

from vit_jax import data
from vit_jax import models
from vit_jax import sharding
from vit_jax.evaluators import common
from vit_jax.evaluators import fewshot
from vit_jax.evaluators import ridge

import report_compare  # pylint: disable=g-bad-import-order

IMAGE = (16, 16)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sharding.make_mesh((("data", -1), ("model", 1)))


@pytest.fixture(scope="module")
def model_and_params():
  model = models.create("testing", num_classes=10, image_size=IMAGE,
                        num_channels=1, patch_size=4)
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)},
                               np.zeros((1, *IMAGE, 1), np.float32))["params"]
  return model, jax.device_get(params)


def _config(**kw):
  c = fewshot.default_config()
  c.update(dict(shots=(1, 5), seeds=(0, 1), batch_size=64,
                l2_regs=(2.0**-2, 2.0**3, 2.0**8)))
  c.update(kw)
  return c


def _evaluator(model, mesh, cfg):
  predict_fn = None if model is None else (
      lambda p, x, **kw: model.apply({"params": p}, x, train=False, **kw))
  return fewshot.Evaluator(predict_fn, mesh, **cfg.to_dict())


def _evaluator_from(cfg, model, mesh):
  return _evaluator(model, mesh, cfg)


def test_sample_is_nested_balanced_and_seeded():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 10)
  np.random.default_rng(0).shuffle(labels)
  rows, counts = fewshot.sample(labels, 3, shots=(1, 2, 5), seeds=(0, 1))
  np.testing.assert_array_equal(counts, [7, 3, 10])
  for s in range(2):
    for small, big in ((1, 2), (2, 5)):
      assert set(rows[small][s]) < set(rows[big][s])
    for n in (1, 2, 5):
      r = rows[n][s]
      assert len(set(r)) == len(r)
      np.testing.assert_array_equal(
          np.bincount(labels[r], minlength=3), np.minimum(n, counts))
  assert set(rows[5][0]) != set(rows[5][1])
  again, _ = fewshot.sample(labels, 3, shots=(1, 2, 5), seeds=(0, 1))
  for n in rows:
    np.testing.assert_array_equal(rows[n], again[n])


def test_features_equal_unsharded_model(mesh, model_and_params):
  model, params = model_and_params
  ev = _evaluator(model, mesh, _config(image_size=IMAGE))
  src = data.get_source("digits", "test")
  x, labels = ev.features(ev._place(params), src)  # 360 = 5 * 64 + 40 padded
  batch = next(iter(data.eval_batches(src, len(src), IMAGE)))
  _, out = model.apply({"params": params}, batch["image"], train=False)
  assert x.shape == (len(src), model.hidden_size)
  np.testing.assert_allclose(x, np.asarray(out["pre_logits"]), atol=1e-5)
  np.testing.assert_array_equal(labels, [src[i]["label"]
                                         for i in range(len(src))])


def _loo_by_refits(x, y, l2s):
  """Per penalty: (wrong LOO predictions, summed squared LOO residuals), each
  example predicted by a ridge fit on the others (no hat-matrix shortcut)."""
  errors, sq_errors = [], []
  for l2 in np.asarray(l2s, np.float64):
    wrong = sq = 0.0
    for i in range(len(x)):
      keep = np.arange(len(x)) != i
      w = np.linalg.solve(x[keep].T @ x[keep] + l2 * np.eye(x.shape[1]),
                          x[keep].T @ y[keep])
      pred = x[i] @ w
      wrong += pred.argmax() != y[i].argmax()
      sq += np.sum((y[i] - pred)**2)
    errors.append(wrong)
    sq_errors.append(sq)
  return np.array(errors), np.array(sq_errors)


def test_pixel_report_matches_sklearn_and_metrics(mesh):
  # The whole default grid: at 1 shot, 12 penalties tie on the LOO error.
  cfg = _config(representation="pixels", l2_regs=ridge.L2_GRID)
  ev = _evaluator(None, mesh, cfg)
  report = ev.report(None)
  train = data.get_source("digits", "train")
  test = data.get_source("digits", "test")
  x_train, x_test = (
      np.stack([s[i]["image"] for i in range(len(s))]).reshape(
          len(s), -1).astype(np.float32) for s in (train, test))
  y_test = np.array([test[i]["label"] for i in range(len(test))])
  rows, _ = fewshot.sample(train.labels, 10, (1, 5), (0, 1))
  for n in ("1", "5"):
    r = report["digits"][n]
    assert r["num_train"] == 10 * int(n) and r["short_classes"] == {}
    assert len(r["per_seed"]) == 2
    np.testing.assert_allclose(r["mean"], np.mean(r["per_seed"]), atol=1e-6)
    for s in range(2):
      # Raw uint8 pixels: whitening removes the [-1, 1] rescaling.
      xs, ys = x_train[rows[int(n)][s]], train.labels[rows[int(n)][s]]
      mean, scale = ridge.whitening(xs)
      xd = np.asarray(ridge.design(xs, mean, scale), np.float64)
      xt = np.asarray(ridge.design(x_test, mean, scale), np.float64)
      # The chosen L2 is the best by leave-one-out, refitted by hand for
      # every penalty and left-out example in float64: fewest wrong
      # predictions, then the least squared residual (within the 1e-3 that
      # float32 squared LOO errors keep on any CPU).
      errors, sq_errors = _loo_by_refits(xd, 2.0 * np.eye(10)[ys] - 1.0,
                                         ev.l2s)
      best = errors == errors.min()
      chosen = ev.l2s.tolist().index(r["l2"][s])
      assert best[chosen], (errors, r["l2"][s])
      assert sq_errors[chosen] <= sq_errors[best].min() * (1 + 1e-3), (
          sq_errors, r["l2"][s])
      for l2, acc in ((r["l2"][s], r["per_seed"][s]),
                      (r["fixed_l2"], r["fixed_l2_per_seed"][s])):
        pred = linear_model.Ridge(alpha=l2, fit_intercept=False).fit(
            xd, 2.0 * np.eye(10)[ys] - 1.0).predict(xt).argmax(-1)
        assert abs(np.mean(pred == y_test) - acc) <= 1.5 / len(y_test)
  m = fewshot.metrics(report, prefix="fewshot/")
  assert m["fewshot/digits/5shot"] == report["digits"]["5"]["mean"]
  assert m["fewshot/digits/5shot_fixed_l2"] == report["digits"]["5"][
      "fixed_l2_mean"]
  assert report["digits"]["5"]["mean"] > report["digits"]["1"]["mean"]

  # A source without `labels` (features of the whole split) gives the same.
  ev2 = _evaluator(None, mesh, cfg)
  ev2.datasets = [("digits", common.Subset(train, np.arange(len(train))),
                   test)]
  report_compare.assert_close(ev2.report(None), report,
                              atol=1.01 / len(y_test), exact_keys=("l2",))


def test_l2_at_the_grid_edge_is_warned_of(mesh):
  # The whole default grid: every choice lies inside it, nothing is warned.
  logs = []
  wide = _evaluator(None, mesh, _config(representation="pixels",
                                        l2_regs=ridge.L2_GRID))
  wide.log = logs.append
  wide_report = wide.report(None)["digits"]
  assert logs == []
  assert not any(r["l2_at_grid_edge"] for r in wide_report.values())
  # A grid above the 5-shot choices (2^12 .. 2^16, with the fixed 2^10):
  # 5-shot lands on its smallest value. The training loop's `run` warns of
  # it, once.
  narrow = _evaluator(None, mesh, _config(
      representation="pixels", l2_regs=(2.0**12, 2.0**14, 2.0**16)))
  narrow.log = logs.append
  narrow.run(None)
  report = narrow.report(None)["digits"]
  assert report["5"]["l2"] == [2.0**10, 2.0**10]
  assert report["5"]["l2_at_grid_edge"] is True
  assert max(wide_report["5"]["l2"]) < 2.0**10  # It really was too high.
  assert ("warning: fewshot digits 5-shot (pixels): leave-one-out chose "
          "L2 = 2^10 for seed(s) 0, 1, the smallest of the grid 2^10 .. 2^16; "
          "a better value may lie below it: widen the few-shot config's "
          "l2_regs below 2^10 (training: --config.evals.fewshot.l2_regs=...; "
          "python -m vit_jax.fewshot: --config.l2_regs=...)") in logs
  # One line per dataset, shot count and edge that some seed chose.
  edges = {(n, e) for n, r in report.items() for e, v in (
      ("smallest", 2.0**10), ("largest", 2.0**16)) if v in r["l2"]}
  warned = [re.search(r" (\d+)-shot \(pixels\): .*, the (smallest|largest) "
                      "of the grid", l).groups() for l in logs]
  assert sorted(warned) == sorted(edges)


def _write_folder(root, counts):
  rng = np.random.default_rng(0)
  for split, per_class in counts.items():
    for c, n in enumerate(per_class):
      d = os.path.join(root, split, f"class{c}")
      os.makedirs(d)
      for i in range(n):
        img = (rng.random((8, 8)) * 80 + 80 * c).astype(np.uint8)
        PIL.Image.fromarray(img).save(os.path.join(d, f"{i}.png"))


def test_short_classes_are_reported(mesh, tmp_path):
  _write_folder(str(tmp_path), {"train": [4, 1, 5], "test": [2, 2, 2]})
  logs = []
  cfg = _config(representation="pixels", shots=(1, 3), batch_size=8,
                datasets=(("tiny", f"folder:{tmp_path}", "train", "test"),))
  ev = _evaluator_from(cfg, None, mesh)
  ev.log = logs.append
  report = ev.report(None)
  assert report["tiny"]["1"]["short_classes"] == {}
  assert report["tiny"]["3"]["short_classes"] == {"1": 1}
  assert report["tiny"]["3"]["num_train"] == 3 + 1 + 3
  short = [l for l in logs if "fewer than" in l]
  assert len(short) == 1 and "class 1: 1" in short[0]
  ev.report(None)
  assert [l for l in logs if "fewer than" in l] == short  # Warned once.


def test_config_errors(mesh):
  with pytest.raises(ValueError, match="not divisible"):
    _evaluator_from(_config(batch_size=12), None, mesh)
  with pytest.raises(ValueError, match="must be \\(name, source"):
    _evaluator_from(_config(datasets=(("digits", "train", "test"),),
                            representation="pixels"), None, mesh)
  with pytest.raises(ValueError, match="needs a model and its image_size"):
    _evaluator_from(_config(), None, mesh)
  with pytest.raises(ValueError, match="unknown few-shot field"):
    fewshot.resolve_config(dict(shotz=(1,)))
  cfg = fewshot.resolve_config(ml_collections.ConfigDict(dict(num_seeds=3)))
  assert tuple(cfg.seeds) == (0, 1, 2)


def test_unknown_representation(mesh, model_and_params):
  model, params = model_and_params
  ev = _evaluator_from(_config(representation="nope", image_size=IMAGE),
                           model, mesh)
  with pytest.raises(ValueError, match="'nope' is not an output"):
    ev.report(params)
