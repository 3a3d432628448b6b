"""Closed-form ridge (evaluators/ridge.py) against scikit-learn and refits."""

import functools

import jax
import numpy as np
import pytest
from sklearn import datasets
from sklearn import linear_model
import threadpoolctl

from vit_jax.evaluators import fewshot
from vit_jax.evaluators import ridge

L2S = (2.0**-3, 1.0, 2.0**4, 2.0**10)


def _random_problem(n, d, k, seed):
  rng = np.random.default_rng(seed)
  means = rng.normal(size=(k, d))
  labels = np.arange(n) % k
  x = (means[labels] + rng.normal(size=(n, d)) * 1.5).astype(np.float32)
  test_labels = np.arange(40) % k
  x_test = (means[test_labels]
            + rng.normal(size=(40, d)) * 1.5).astype(np.float32)
  return x, labels, x_test, test_labels


def _digits_problem(per_class):
  """Raw 8x8 digit pixels: the first `per_class` of each class train."""
  x, y = datasets.load_digits(return_X_y=True)
  x = x.astype(np.float32)
  train = np.concatenate([np.flatnonzero(y == c)[:per_class]
                          for c in range(10)])
  test = np.setdiff1d(np.arange(len(y)), train)[:300]
  return x[train], y[train], x[test], y[test]


def _design(x, x_test):
  mean, scale = ridge.whitening(x)
  return (np.asarray(ridge.design(x, mean, scale), np.float64),
          np.asarray(ridge.design(x_test, mean, scale), np.float64))


@functools.lru_cache(maxsize=None)
def _fit_predict(num_classes):
  return jax.jit(functools.partial(ridge.fit_predict, num_classes=num_classes))


PROBLEMS = {
    "random_primal": lambda: _random_problem(120, 20, 4, 0),   # N > D + 1
    "random_dual": lambda: _random_problem(24, 50, 4, 1),      # N < D + 1
    "digits_primal": lambda: _digits_problem(20),              # 200 > 65
    "digits_dual": lambda: _digits_problem(3),                 # 30 < 65
}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_predictions_match_sklearn_ridge(name):
  x, labels, x_test, test_labels = PROBLEMS[name]()
  k = int(max(labels.max(), test_labels.max())) + 1
  xd, xd_test = _design(x, x_test)
  y = 2.0 * np.eye(k)[labels] - 1.0
  n, r = xd.shape
  assert ridge.eigen(xd.astype(np.float32), y).dual == (n < r)
  for l2 in L2S:
    ours = np.asarray(_fit_predict(k)(x, labels, x_test, l2))
    ref = linear_model.Ridge(alpha=l2, fit_intercept=False).fit(
        xd, y).predict(xd_test)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(ours, ref, atol=2e-4 * scale, rtol=0,
                               err_msg=f"{name} l2={l2}")
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_bias_column_is_penalised():
  # A centred design: the bias weight is sum(y) / (N * bias² + l2) * bias.
  x, labels, _, _ = _random_problem(60, 5, 3, 2)
  y = np.asarray(ridge.targets(labels, 3))
  mean, scale = ridge.whitening(x)
  for bias in (1.0, 10.0):
    xd = ridge.design(x, mean, scale, bias)
    w = np.asarray(ridge.weights(ridge.eigen(xd, y), 8.0))
    expected = y.sum(0) * bias / (len(y) * bias**2 + 8.0)
    np.testing.assert_allclose(w[-1], expected, rtol=1e-4, atol=1e-6)


def test_constant_train_columns_are_dropped():
  x = np.array([[0.0, 1.0, 0.1], [0.0, 3.0, 0.1], [0.0, 5.0, 0.1]],
               np.float32)
  mean, scale = ridge.whitening(x)
  test = ridge.design(np.array([[7.0, 3.0, 9.0]], np.float32), mean, scale)
  np.testing.assert_allclose(np.asarray(test), [[0.0, 0.0, 0.0, 1.0]],
                             atol=1e-6)


def _brute_force_loo(xd, labels, k, l2s):
  """LOO by refitting N times per l2 on the fixed design, in float64."""
  y = 2.0 * np.eye(k)[labels] - 1.0
  n, r = xd.shape
  preds = np.zeros((len(l2s), n, k))
  for a, l2 in enumerate(l2s):
    for i in range(n):
      keep = np.arange(n) != i
      xi, yi = xd[keep], y[keep]
      w = np.linalg.solve(xi.T @ xi + l2 * np.eye(r), xi.T @ yi)
      preds[a, i] = xd[i] @ w
  error = (preds.argmax(-1) != labels).mean(-1)
  sq_error = ((y - preds)**2).sum(-1).mean(-1)
  return preds, error, sq_error


@pytest.mark.parametrize("n,d", [(36, 6), (12, 20)])  # primal, dual
def test_leave_one_out_matches_refits(n, d):
  k = 3
  x, labels, _, _ = _random_problem(n, d, k, seed=n)
  l2s = np.array([2.0**e for e in range(-6, 9, 2)], np.float32)
  xd, _ = _design(x, x)
  preds, error, sq_error = _brute_force_loo(xd, labels, k, l2s)

  y = ridge.targets(labels, k)
  e = ridge.eigen(xd.astype(np.float32), y)
  assert e.dual == (n < d + 1)
  for a, l2 in enumerate(l2s):
    ours = np.asarray(y - ridge.loo_residuals(e, y, l2))
    np.testing.assert_allclose(ours, preds[a], atol=2e-3 * np.abs(
        preds[a]).max(), rtol=0, err_msg=f"l2={l2}")
  our_error, our_sq = (np.asarray(v) for v in ridge.loo_errors(e, y, l2s))
  np.testing.assert_allclose(our_error, error, atol=1e-6)
  np.testing.assert_allclose(our_sq, sq_error, rtol=1e-3)
  best = np.lexsort((sq_error, error))[0]
  assert int(ridge.select(our_error, our_sq)) == best


def test_select_breaks_ties_by_squared_error():
  error = np.array([0.2, 0.1, 0.1, 0.3])
  sq_error = np.array([0.5, 3.0, 2.0, 1.0])
  assert int(ridge.select(error, sq_error)) == 2


def test_evaluate_combines_fit_and_selection():
  x, labels, x_test, test_labels = _digits_problem(5)
  l2s = np.array(L2S, np.float32)
  out = jax.jit(functools.partial(ridge.evaluate, num_classes=10))(
      x, labels, x_test, test_labels, l2s)
  for a, l2 in enumerate(L2S):
    scores = np.asarray(_fit_predict(10)(x, labels, x_test, l2))
    np.testing.assert_allclose(out["accuracy"][a],
                               np.mean(scores.argmax(-1) == test_labels),
                               atol=1e-6)
  # The choice: least LOO error, ties broken by the squared error, from
  # N refits per penalty in float64 (the errors as counts of examples).
  xd, _ = _design(x, x_test)
  _, error, sq_error = _brute_force_loo(xd, labels, 10, L2S)
  np.testing.assert_allclose(out["loo_error"], error, atol=1e-6)
  np.testing.assert_allclose(out["loo_sq_error"], sq_error, rtol=1e-3)
  assert int(out["best"]) == int(np.lexsort((sq_error, error))[0])
  # Raw pixels of 5 digits per class separate the classes well above chance.
  assert float(out["accuracy"].max()) > 0.5


@pytest.mark.parametrize("per_class", [3, 10])  # N = 30 < 65 (dual), 100
def test_seeds_concurrently_as_one_after_another_and_vmapped(per_class):
  x, labels, x_test, test_labels = _digits_problem(25)
  rng = np.random.default_rng(per_class)
  rows = np.stack([np.concatenate([
      rng.permutation(np.flatnonzero(labels == c))[:per_class]
      for c in range(10)]) for _ in range(3)])
  l2s = np.array(L2S, np.float32)
  fn = functools.partial(ridge.evaluate, num_classes=10)
  blas_threads = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
  concurrent = fewshot.PerSeed(fn, workers=2)
  args = (x[rows], labels[rows], x_test, test_labels, l2s)
  out = concurrent(*args)
  # The libraries' thread counts are restored after the concurrent calls.
  assert [i["num_threads"] for i in threadpoolctl.threadpool_info()
          ] == blas_threads
  serial = fewshot.PerSeed(fn, workers=1)(*args)
  vmapped = jax.device_get(concurrent.batched(args[0], args[1], args[2:]))
  assert set(out) == {"accuracy", "loo_error", "loo_sq_error", "best"}
  # Serial and concurrent calls run the same code with the same BLAS
  # threading (one thread): bit for bit the same. A vmapped call, or a seed
  # jitted alone with the libraries' own threading, sums in another order:
  # the squared errors agree to float32 round-off (rtol 1e-3 on any CPU),
  # the accuracies within one of the 300 test images, the LOO errors within
  # one training example, and the chosen penalty is the best or one that
  # these tolerances cannot tell from it.
  for key, value in out.items():
    assert value.shape == vmapped[key].shape and value.shape[0] == 3
    np.testing.assert_array_equal(value, serial[key], err_msg=key)
  one_image, one_example = 1.01 / len(test_labels), 1.01 / rows.shape[1]
  for s in range(3):
    alone = jax.jit(fn)(x[rows[s]], labels[rows[s]], x_test, test_labels, l2s)
    ours = {k: v[s] for k, v in out.items()}
    for other in ({k: v[s] for k, v in vmapped.items()}, alone):
      np.testing.assert_allclose(ours["loo_sq_error"], other["loo_sq_error"],
                                 rtol=1e-3)
      np.testing.assert_allclose(ours["accuracy"], other["accuracy"],
                                 atol=one_image, rtol=0)
      np.testing.assert_allclose(ours["loo_error"], other["loo_error"],
                                 atol=one_example, rtol=0)
      best, chosen = int(ours["best"]), int(other["best"])
      assert ours["loo_error"][chosen] <= ours["loo_error"][best] + one_example
      if ours["loo_error"][chosen] == ours["loo_error"][best]:
        assert ours["loo_sq_error"][chosen] <= ours["loo_sq_error"][best] * (
            1 + 1e-3)


def test_l2_index():
  assert ridge.l2_index(ridge.L2_GRID, ridge.FIXED_L2) == 20
  with pytest.raises(ValueError, match="not in the l2 grid"):
    ridge.l2_index((1.0, 2.0), 3.0)
