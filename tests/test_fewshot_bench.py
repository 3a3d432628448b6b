"""`python -m vit_jax.bench fewshot` at a tiny size: runs and agrees."""

import functools
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn import linear_model

from vit_jax.bench import __main__ as bench
from vit_jax.bench import fewshot
from vit_jax.evaluators import ridge

TINY = ["--classes=4", "--dim=12", "--shots=1,5", "--seeds=2",
        "--test_per_class=5", "--l2_exponents=-2,4,10", "--repeats=1"]
# One shot count (N = 20 >= D + 1) keeps the compilations of every side few.
TINY_5_SHOTS = [a for a in TINY if not a.startswith("--shots")] + ["--shots=5"]


def test_fewshot_bench_agrees_with_sklearn(capsys):
  assert bench.main(["bench", "fewshot"] + TINY_5_SHOTS + ["--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["setup"]["fits"] == 2 * 3
  assert result["setup"]["eigendecompositions"] == 2
  assert result["setup"]["l2s"] == [0.25, 16.0, 1024.0]
  peers = list(fewshot.PEERS)
  assert result["setup"]["peers"] == peers
  sides = ["ours", "ours_no_loo", "ours_eigh"] + peers
  for key in ("seconds", "seconds_min", "seconds_max", "seconds_per_shots"):
    assert list(result[key]) == sides
  for side in sides:
    assert (result["seconds_min"][side] <= result["seconds"][side]
            <= result["seconds_max"][side])
  for key in ("speedups", "speedups_no_loo"):
    assert list(result[key]) == peers
    assert all(math.isfinite(v) and v > 0 for v in result[key].values())
  assert result["speedup"] == result["speedups"]["ridge_classifier"]
  # RidgeCV solves our problem: it picks our L2 of least LOO squared error
  # (in float64 against our float32: wherever the best two are further apart
  # than float32 round-off).
  assert result["same_l2_fits"] == 2
  assert set(result["same_l2"]) == {"ridgecv_eigen", "ridgecv_svd"}
  assert 0 <= result["same_l2_with_intercept"] <= 2
  assert result["loo_sq_margin"] > 0
  if result["loo_sq_margin"] > 1e-3:
    assert result["same_l2"] == {"ridgecv_eigen": 2, "ridgecv_svd": 2}
    for p in ("ridgecv_eigen", "ridgecv_svd"):
      assert (result["ridgecv_l2_per_shots"][p]
              == result["loo_sq_l2_per_shots"])
  assert list(result["agreement"]) == peers
  assert result["accuracies_within_one_example_except_big_vision"]
  for p, a in result["agreement"].items():
    assert a["within_one_example"] == (a["max_difference_in_test_examples"]
                                       <= 1)
    assert a["fit"] == ("(shots, seed)" if p.startswith("ridgecv")
                        else "(shots, seed, l2)")
  # Same design and targets: the same test accuracy for every (shots, seed,
  # l2) up to a near-tie of one test example (float32 against float64).
  for p in ("cholesky", "big_vision"):
    assert result["agreement"][p]["max_difference_in_test_examples"] <= 1
    assert result["agreement"][p]["fits"] == 2 * 3
  assert set(result["loo_l2_per_shots"]) == {"5"}
  assert len(result["loo_l2_per_shots"]["5"]) == 2


def test_fewshot_bench_prints_a_table(capsys):
  # Both regimes: 1 shot is dual (N = 4 < D + 1), 5 shots primal.
  args = TINY + ["--peers=ridgecv_eigen"]
  assert bench.main(["bench", "fewshot"] + args) == 0
  out = capsys.readouterr().out
  assert "peer/ours" in out
  # Each agreement line names what was compared, in what unit, against what.
  assert ("  test accuracy against ours on the same training set and L2 "
          "(RidgeCV: at its chosen L2), in correctly classified test examples "
          "of 20:\n    ridgecv_eigen, 4 (shots, seed) fits: " in out)
  assert ("  ridgecv_eigen: within one test example of ours in every fit: True"
          in out)
  assert "RidgeCV(gcv_mode='eigen')" in out and "RidgeClassifier" not in out
  assert ("  chosen L2 per (shots, seed) fit, RidgeCV's alpha_ against ours of "
          "least LOO squared error" in out)
  assert "    ridgecv_eigen: the same L2 in 4 of 4 fits, another in 0\n" in out


@pytest.mark.parametrize("shots", [2, 8])  # N = 6 < D + 1 = 11 (dual), 24
def test_loo_squared_error_choice_is_ridgecv_alpha(shots):
  k, d = 3, 10
  rng = np.random.default_rng(shots)
  (x, labels), sample = fewshot._clustered_features(rng, k, d, shots,
                                                    spread=0.6)
  x_test, test_labels = sample(4)
  l2s = np.array([2.0**e for e in range(-4, 9, 2)], np.float32)
  out = jax.jit(functools.partial(ridge.evaluate, num_classes=k))(
      x, labels, x_test, test_labels, l2s)
  sq = np.asarray(out["loo_sq_error"])
  ours = int(np.argmin(sq))
  second = np.sort(sq)[1]
  # The best two are further apart than float32 round-off: float64 RidgeCV
  # must choose the same.
  assert (second - sq[ours]) / sq[ours] > 1e-3
  xw, _ = fewshot.whitened(x, x_test, bias=1.0)
  for mode in ("eigen", "svd"):
    assert fewshot.ridgecv(xw, labels, l2s, k, mode).alpha_ == l2s[ours]
  # The whole curve: RidgeCV's mean LOO squared error per target is ours / K.
  y = 2.0 * np.eye(k)[labels] - 1.0
  cv = linear_model.RidgeCV(alphas=l2s.astype(np.float64), gcv_mode="eigen",
                            fit_intercept=False, store_cv_results=True).fit(
                                xw, y)
  np.testing.assert_allclose(np.asarray(out["loo_sq_error"]) / k,
                             cv.cv_results_.mean(axis=(0, 1)), rtol=1e-3)


@pytest.mark.parametrize("args, message", [
    (["fewshot", "--shots=1,x"], "--shots takes comma-separated numbers"),
    (["fewshot", "--shots=0"], "--shots must be positive"),
    (["fewshot", "--classes=1"], "classes"),
    (["fewshot", "--peers=ridge,ridgecv_eigen"], "unknown peer(s) ridge"),
    (["fewshot", "--fewshot_classes=4"], "fewshot_classes"),
    (["speed"], "unknown benchmark 'speed'"),
])
def test_bad_input_is_one_error_line(args, message, capsys):
  assert bench.main(["bench"] + args) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert message in lines[0]


def test_command_line_without_subcommand_prints_usage():
  proc = subprocess.run([sys.executable, "-m", "vit_jax.bench"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.startswith(
      "error: name a benchmark; usage: python -m vit_jax.bench {throughput,")
  assert "Traceback" not in proc.stderr


def test_subcommand_help_lists_its_own_flags(capsys):
  assert bench.main(["bench", "fewshot", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--classes" in out and "--l2_exponents" in out
  assert "--batch" not in out
