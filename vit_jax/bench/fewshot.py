"""Few-shot solver: our closed-form ridge against scikit-learn and big_vision.

  python -m vit_jax.bench fewshot [--classes=100 --dim=768 --shots=1,5,10,25
      --seeds=5 --l2_exponents=-2,1,4,7,10,13,16,19 --test_per_class=10
      --repeats=3 --peers=ridge_classifier,ridgecv_eigen,ridgecv_svd,
      big_vision,cholesky --json]

Ours is `vit_jax/evaluators/ridge.py` (docs/design.md §6): one
eigendecomposition per (shots, seed) serving every L2 value, called as the
few-shot evaluator calls it (`fewshot.solver`: on CPU one jitted call per
seed, the seeds concurrently), timed warm, with and without the leave-one-out
(LOO) choice of L2. Its peers (`--peers`), on the same whitened features,
splits and L2 values:

  ridge_classifier  scikit-learn `RidgeClassifier(alpha=l2)`, one fit per
                    (shots, seed, l2).
  ridgecv_eigen     scikit-learn `RidgeCV(alphas=l2s, gcv_mode="eigen",
                    alpha_per_target=False, fit_intercept=False)` per
                    (shots, seed): one eigendecomposition (of XXᵀ or XᵀX,
                    the smaller) for every L2, which it chooses by LOO
                    squared error; then the test predictions at that L2.
  ridgecv_svd       the same with `gcv_mode="svd"` (thin SVD of X).
  big_vision        big_vision's `evaluators/fewshot_lsr.py` algorithm: per
                    (shots, seed) one jitted eigendecomposition cache (bias
                    column 100, almost unpenalised), then one jitted test
                    accuracy call per L2 value; no L2 choice.
  cholesky          a fixed-L2 direct solve: per (shots, seed, l2) one
                    Cholesky factorisation of XᵀX + l2·I (XXᵀ + l2·I when
                    N < D + 1) and the test accuracy, jitted and vmapped over
                    seeds and L2 values; no L2 choice.

The RidgeCV peers are given our design (whitened features and a bias column
of ones, penalised like the features) and our {-1, 1} targets, so they solve
exactly our problem: their chosen `alpha_` must equal the L2 of least LOO
squared error of ours ("loo_sq_error"), and the benchmark counts the
(shots, seed) for which it does. With `fit_intercept=True` (an unpenalised
intercept) RidgeCV minimises a different LOO error; how often that choice
agrees is reported too ("same_l2_with_intercept", untimed). The features are
synthetic and class-clustered (class means ~ N(0, 0.3²), unit noise,
float32), the shot sets nested within a seed.

Each peer's test accuracy is compared with ours on the same training set and
L2 (a RidgeCV peer at the L2 it chose), as the number of correctly classified
test examples: per peer, in how many fits it differs and by at most how many
examples ("agreement"). A float32 near-tie may flip one test example, so a
peer agrees with ours when it is within one test example in every fit
("within_one_example"); "accuracies_within_one_example_except_big_vision"
holds when every peer but big_vision does. big_vision's accuracies are
reported but not required to agree: its float32 eigendecomposition of a
design with a bias column of 100 loses digits at small L2 values.

The sides run interleaved (ours, ours without LOO, ours' whitening, Gram
matrices and eigendecompositions alone, each peer; `--repeats` times); each
is reported as the median with the min and max of its runs, and the speedups
are ratios of medians.
"""

import functools
import math
import time
import warnings

from absl import flags

from vit_jax import bench

PEERS = {
    "ridge_classifier": "scikit-learn RidgeClassifier, one fit per L2",
    "ridgecv_eigen": "scikit-learn RidgeCV(gcv_mode='eigen'), LOO choice",
    "ridgecv_svd": "scikit-learn RidgeCV(gcv_mode='svd'), LOO choice",
    "big_vision": "big_vision fewshot_lsr (eigh cache, call per L2)",
    "cholesky": "fixed-L2 Cholesky solve per L2 (jit, vmap)",
}
# big_vision's constant bias feature ("large so it's almost unregularized").
BIG_VISION_BIAS = 100.0

FLAGS = flags.FlagValues()
flags.DEFINE_integer("classes", 100, "Number of classes.", lower_bound=2,
                     flag_values=FLAGS)
flags.DEFINE_integer("dim", 768, "Feature dimension.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_list("shots", ["1", "5", "10", "25"],
                  "Training examples per class (comma-separated).",
                  flag_values=FLAGS)
flags.DEFINE_integer("seeds", 5, "Seeds (training samples) per shot count.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("l2_exponents", ["-2", "1", "4", "7", "10", "13", "16", "19"],
                  "The L2 values are 2 to these powers (comma-separated).",
                  flag_values=FLAGS)
flags.DEFINE_integer("test_per_class", 10, "Test examples per class.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_list("peers", list(PEERS),
                  f"Peers timed beside ours (comma-separated, of "
                  f"{','.join(PEERS)}).", flag_values=FLAGS)
bench.define_output_flags(FLAGS, "Timed runs per side (interleaved); the "
                          "median counts.")


def _numbers(name, values, kind):
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise ValueError(f"--{name} takes comma-separated numbers, got "
                     f"{','.join(values)!r}") from None


def from_flags(f):
  """Keyword arguments of `run` from the parsed flags `f`."""
  return dict(classes=f.classes, dim=f.dim,
              shots=_numbers("shots", f.shots, int), seeds=f.seeds,
              l2_exponents=_numbers("l2_exponents", f.l2_exponents, float),
              test_per_class=f.test_per_class, repeats=f.repeats,
              peers=list(f.peers))


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _clustered_features(rng, num_classes, dim, per_class, spread=0.3):
  """Class means ~ N(0, spread²), examples = mean + N(0, 1); float32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  means = rng.normal(size=(num_classes, dim)).astype(np.float32) * spread

  def sample(n):
    labels = np.repeat(np.arange(num_classes), n)
    x = means[labels] + rng.normal(size=(len(labels), dim)).astype(np.float32)
    return x, labels

  return sample(per_class), sample


def whitened(x, x_test, bias=None):
  """Train and test features whitened by the train statistics (numpy).

  Centred by the train mean and divided by its std + 1e-5, as ours does
  (`ridge.whitening`; the synthetic features have no constant columns).

  Args:
    x: [N, D] train features.
    x_test: [T, D] test features.
    bias: if given, a constant column of this value is appended to both (our
      design, `ridge.design`).

  Returns:
    ([N, D'], [T, D']) float32 arrays, D' = D or D + 1.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  mean, std = x.mean(0), x.std(0) + 1e-5
  xw, tw = (x - mean) / std, (x_test - mean) / std
  if bias is not None:
    xw, tw = (np.concatenate([a, np.full((len(a), 1), bias, a.dtype)], 1)
              for a in (xw, tw))
  return xw, tw


def ridgecv(x, labels, l2s, num_classes, gcv_mode, fit_intercept=False):
  """scikit-learn's RidgeCV on {-1, 1} targets: the fitted model.

  Args:
    x: [N, D'] design (with `fit_intercept=False` our design: whitened
      features and a bias column).
    labels: [N] int labels.
    l2s: [L] penalties, in the order of ours (ties go to the first).
    num_classes: K.
    gcv_mode: "eigen" or "svd".
    fit_intercept: fit an unpenalised intercept (centres x and targets).

  Returns:
    The fitted `RidgeCV`; `alpha_` is the L2 of least LOO squared error.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  return linear_model.RidgeCV(
      alphas=np.asarray(l2s, np.float64), gcv_mode=gcv_mode,
      alpha_per_target=False, fit_intercept=fit_intercept).fit(x, y)


def big_vision_cache(x, labels, num_classes):
  """big_vision's `_precompute_cache`: whitening and one eigendecomposition.

  Features are whitened (std + 1e-5), a constant column BIG_VISION_BIAS is
  appended, targets are {-1, 1}; eigh of XᵀX when N >= D + 1, else of XXᵀ.
  Jit it with `num_classes` static.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mean = jnp.mean(x, axis=0, keepdims=True)
  std = jnp.std(x, axis=0, keepdims=True) + 1e-5
  x = jnp.pad((x - mean) / std, ((0, 0), (0, 1)),
              constant_values=BIG_VISION_BIAS)
  y = 2.0 * jax.nn.one_hot(labels, num_classes) - 1.0
  if x.shape[0] >= x.shape[1]:
    eigs, q = jnp.linalg.eigh(x.T @ x)
    rhs, lhs = q.T @ (x.T @ y), q
  else:
    eigs, q = jnp.linalg.eigh(x @ x.T)
    rhs, lhs = q.T @ y, x.T @ q
  return dict(eigs=eigs, rhs=rhs, lhs=lhs, mean=mean, std=std)


def big_vision_accuracy(cache, x_test, labels_test, l2):
  """big_vision's `_eig_fewshot_acc_fn`: test accuracy for one L2 value."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x_test = jnp.pad((x_test - cache["mean"]) / cache["std"], ((0, 0), (0, 1)),
                   constant_values=BIG_VISION_BIAS)
  scaling = (1.0 / (cache["eigs"] + l2)).reshape((1, -1))
  w = (cache["lhs"] * scaling) @ cache["rhs"]
  return jnp.mean(jnp.argmax(x_test @ w, axis=1) == labels_test)


def cholesky_accuracy(x_train, labels_train, x_test, labels_test, l2s, *,
                      num_classes):
  """Test accuracy [L] of the fixed-L2 solve, one Cholesky per L2 value.

  Our design and targets (`ridge.design`, `ridge.targets`); W = (XᵀX +
  l2·I)⁻¹XᵀY when N >= D + 1, else Xᵀ(XXᵀ + l2·I)⁻¹Y.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import ridge  # pylint: disable=g-import-not-at-top
  mean, scale = ridge.whitening(x_train)
  x = ridge.design(x_train, mean, scale)
  xte = ridge.design(x_test, mean, scale)
  y = ridge.targets(labels_train, num_classes)
  hi = jax.lax.Precision.HIGHEST
  primal = x.shape[0] >= x.shape[1]
  gram = (jnp.matmul(x.T, x, precision=hi) if primal
          else jnp.matmul(x, x.T, precision=hi))
  rhs = jnp.matmul(x.T, y, precision=hi) if primal else y
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)

  def accuracy(l2):
    factor = jax.scipy.linalg.cho_factor(gram + l2 * eye)
    w = jax.scipy.linalg.cho_solve(factor, rhs)
    if not primal:
      w = jnp.matmul(x.T, w, precision=hi)
    scores = jnp.matmul(xte, w, precision=hi)
    return jnp.mean(jnp.argmax(scores, axis=-1) == labels_test)

  return jax.vmap(accuracy)(jnp.asarray(l2s, jnp.float32))


@functools.lru_cache(maxsize=None)
def _jitted(name, num_classes=None, loo=True):
  """The jitted functions of the JAX sides, compiled once per process.

  "ours" is the few-shot evaluator's solver (`fewshot.solver`: on CPU the
  seeds run concurrently, one jitted call each), "eigh" its whitening, Gram
  matrices and eigendecompositions run the same way; "cholesky" is vmapped
  over seeds; "big_vision" is (cache, accuracy), jitted as in big_vision.
  All are compiled with the XLA options of ours (`xla_options`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import xla_options  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  options = xla_options.for_backend()
  if name == "big_vision":
    return (jax.jit(big_vision_cache, static_argnums=2,
                    compiler_options=options),
            jax.jit(big_vision_accuracy, compiler_options=options))
  if name == "eigh":
    return fewshot.PerSeed(functools.partial(_eigenvalues,
                                             num_classes=num_classes))
  if name == "ours":
    return fewshot.solver(num_classes, loo=loo)
  fn = functools.partial(cholesky_accuracy, num_classes=num_classes)
  return jax.jit(jax.vmap(fn, in_axes=(0, 0, None, None, None)),
                 compiler_options=options)


def _eigenvalues(x_train, labels_train, *, num_classes):
  """The part of ours that every L2 shares: whitening, Gram matrix, eigh."""
  from vit_jax.evaluators import ridge  # pylint: disable=g-import-not-at-top
  mean, scale = ridge.whitening(x_train)
  e = ridge.eigen(ridge.design(x_train, mean, scale),
                  ridge.targets(labels_train, num_classes))
  return e.eigs  # The other products are left out by the compiler.


def run(*, classes, dim, shots, seeds, l2_exponents, test_per_class, repeats,
        peers=tuple(PEERS)):
  """Few-shot ridge (ours) against its peers, same features and splits.

  Returns:
    A JSON-serialisable dict: "setup"; per side (ours, ours_no_loo,
    ours_eigh (its whitening, Gram matrices and eigendecompositions alone)
    and each peer) the "seconds" (median), "seconds_min", "seconds_max", all
    runs and the medians per shot count; "speedups" (peer median / ours
    median; against ours without LOO in "speedups_no_loo"; "speedup" and
    "speedup_no_loo" are those of ridge_classifier); "same_l2" (per RidgeCV
    peer, for how many of the "same_l2_fits" (shots, seed) its alpha_ is our
    L2 of least LOO squared error; "loo_sq_margin" is the smallest relative
    gap between our least and second-least LOO squared errors, under which
    a float64 solver may rightly choose the other) and
    "same_l2_with_intercept" (the same
    count for RidgeCV(eigen, fit_intercept=True), untimed); "agreement" per
    peer: of its "fits" (one per "fit": (shots, seed, l2), or (shots, seed)
    for a RidgeCV peer, at its chosen L2), how many give another number of
    correctly classified test examples than ours ("fits_that_differ"), by at
    most how many ("max_difference_in_test_examples"), and
    "within_one_example";
    "accuracies_within_one_example_except_big_vision"; the chosen L2
    values. Raises ValueError for bad input.
  """
  if not shots or min(shots) < 1:
    raise ValueError(f"--shots must be positive integers, got {shots}")
  if not l2_exponents:
    raise ValueError("--l2_exponents needs at least one value")
  for name, value, low in (("classes", classes, 2), ("dim", dim, 1),
                           ("seeds", seeds, 1),
                           ("test_per_class", test_per_class, 1),
                           ("repeats", repeats, 1)):
    if value < low:
      raise ValueError(f"--{name} must be at least {low}, got {value}")
  peers = list(dict.fromkeys(peers))
  unknown = [p for p in peers if p not in PEERS]
  if unknown:
    raise ValueError(f"--peers: unknown peer(s) {','.join(unknown)}; choose "
                     f"from {','.join(PEERS)}")

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top

  k, d = classes, dim
  l2s = np.array([2.0**e for e in l2_exponents], np.float32)
  rng = np.random.default_rng(0)
  pool_size = max(shots)
  (pool, pool_y), sample = _clustered_features(rng, k, d, pool_size)
  test, test_y = sample(test_per_class)
  # Nested shot sets: one permutation per class and seed, prefixes per shots.
  order = {s: np.stack([rng.permutation(pool_size) for _ in range(k)])
           for s in range(seeds)}
  rows = {(n, s): (np.arange(k)[:, None] * pool_size
                   + order[s][:, :n]).reshape(-1)
          for n in shots for s in range(seeds)}
  # Tiny L2 values on centred 1-shot features (kernel of rank N - 1) make
  # scikit-learn warn about ill-conditioning; its answers are still used.
  warnings.simplefilter("ignore", category=scipy.linalg.LinAlgWarning)

  def per_shot_count(fit):
    """Times `fit(n)` for every shot count: ({n: output}, {n: seconds})."""
    out, seconds = {}, {}
    for n in shots:
      seconds[n], out[n] = _timed(functools.partial(fit, n))
    return out, seconds

  def ours_fn(loo):
    ev = _jitted("ours", k, loo)

    def fit(n):
      idx = np.stack([rows[n, s] for s in range(seeds)])
      return ev(pool[idx], pool_y[idx], test, test_y, l2s)

    return functools.partial(per_shot_count, fit)

  eigenvalues = _jitted("eigh", k)

  def eigh_fit(n):
    idx = np.stack([rows[n, s] for s in range(seeds)])
    return eigenvalues(pool[idx], pool_y[idx])

  def ridge_classifier_fit(n):
    acc = np.zeros((seeds, len(l2s)))
    for s in range(seeds):
      xw, tw = whitened(pool[rows[n, s]], test)
      for j, l2 in enumerate(l2s):
        clf = linear_model.RidgeClassifier(alpha=float(l2)).fit(
            xw, pool_y[rows[n, s]])
        acc[s, j] = np.mean(clf.predict(tw) == test_y)
    return acc

  def ridgecv_fit(gcv_mode, n):
    chosen, acc = np.zeros(seeds, int), np.zeros(seeds)
    for s in range(seeds):
      xw, tw = whitened(pool[rows[n, s]], test, bias=1.0)
      model = ridgecv(xw, pool_y[rows[n, s]], l2s, k, gcv_mode)
      chosen[s] = np.flatnonzero(l2s == model.alpha_)[0]
      acc[s] = np.mean(np.argmax(model.predict(tw), axis=-1) == test_y)
    return chosen, acc

  bv_cache, bv_accuracy = _jitted("big_vision")

  def big_vision_fit(n):
    acc = []
    for s in range(seeds):
      cache = bv_cache(pool[rows[n, s]], pool_y[rows[n, s]], k)
      acc.append([bv_accuracy(cache, test, test_y, l2) for l2 in l2s])
    return np.array(jax.device_get(acc))

  chol = _jitted("cholesky", k)

  def cholesky_fit(n):
    idx = np.stack([rows[n, s] for s in range(seeds)])
    return jax.device_get(chol(pool[idx], pool_y[idx], test, test_y, l2s))

  fits = {"ridge_classifier": ridge_classifier_fit,
          "ridgecv_eigen": functools.partial(ridgecv_fit, "eigen"),
          "ridgecv_svd": functools.partial(ridgecv_fit, "svd"),
          "big_vision": big_vision_fit, "cholesky": cholesky_fit}
  sides = {"ours": ours_fn(loo=True), "ours_no_loo": ours_fn(loo=False),
           "ours_eigh": functools.partial(per_shot_count, eigh_fit)}
  for p in peers:
    sides[p] = functools.partial(per_shot_count, fits[p])
  compile_s, _ = _timed(sides["ours"])
  for name in ("ours_no_loo", "ours_eigh", "big_vision", "cholesky"):
    if name in sides:  # Compiled before timing, like ours.
      sides[name]()
  times = {name: [] for name in sides}
  shot_times = {name: [] for name in sides}
  outputs = {}
  for _ in range(repeats):
    for name, fn in sides.items():
      t, (outputs[name], per_shots) = _timed(fn)
      times[name].append(t)
      shot_times[name].append(per_shots)

  ours = outputs["ours"]
  ours_acc = np.stack([ours[n]["accuracy"] for n in shots])  # [S, seeds, L]
  ours_sq = np.stack([np.argmin(ours[n]["loo_sq_error"], axis=-1)
                      for n in shots])  # [S, seeds]
  ours_best = np.stack([ours[n]["best"] for n in shots])
  # How far apart our least and second-least LOO squared errors are
  # (relative, the smallest over fits): below float32 round-off a solver in
  # float64 may rightly pick the other one.
  sq_sorted = np.sort(np.stack([ours[n]["loo_sq_error"] for n in shots]), -1)
  sq_margin = (float(np.min((sq_sorted[..., 1] - sq_sorted[..., 0])
                            / sq_sorted[..., 0]))
               if sq_sorted.shape[-1] > 1 else float("inf"))
  num_test = len(test_y)
  agreement, same_l2, ridgecv_l2 = {}, {}, {}

  def agree(name, acc, ref, fit):
    # Differences in numbers of correctly classified test examples.
    diff = np.rint(np.abs(acc - ref) * num_test).astype(int)
    agreement[name] = dict(fits_that_differ=int((diff > 0).sum()),
                           max_difference_in_test_examples=int(diff.max()),
                           within_one_example=bool(diff.max() <= 1),
                           fits=int(diff.size), fit=fit)

  for p in peers:
    if not p.startswith("ridgecv"):  # Accuracy per (shots, seed, l2).
      agree(p, np.stack([outputs[p][n] for n in shots]), ours_acc,
            "(shots, seed, l2)")
      continue
    chosen = np.stack([outputs[p][n][0] for n in shots])
    acc = np.stack([outputs[p][n][1] for n in shots])
    same_l2[p] = int((chosen == ours_sq).sum())
    ridgecv_l2[p] = {str(n): l2s[chosen[i]].tolist()
                     for i, n in enumerate(shots)}
    # Test accuracy at RidgeCV's L2 against ours at the same L2.
    agree(p, acc, np.take_along_axis(ours_acc, chosen[..., None], -1)[..., 0],
          "(shots, seed)")
  same_with_intercept = None
  if "ridgecv_eigen" in peers:
    # Untimed: RidgeCV with an unpenalised intercept on the whitened
    # features (no bias column) minimises another LOO error.
    same_with_intercept = 0
    for i, n in enumerate(shots):
      for s in range(seeds):
        xw, _ = whitened(pool[rows[n, s]], test)
        model = ridgecv(xw, pool_y[rows[n, s]], l2s, k, "eigen",
                        fit_intercept=True)
        same_with_intercept += int(l2s[ours_sq[i, s]] == model.alpha_)

  spread = {name: bench.spread(v) for name, v in times.items()}
  med = {name: s["median"] for name, s in spread.items()}
  result = {
      "setup": dict(classes=k, dim=d, shots=shots, seeds=seeds,
                    l2s=l2s.tolist(), test_examples=num_test,
                    fits=len(shots) * seeds * len(l2s),
                    eigendecompositions=len(shots) * seeds,
                    backend=jax.default_backend(),
                    devices=jax.device_count(), repeats=repeats,
                    peers=peers),
      "seconds": med,
      "seconds_min": {name: s["min"] for name, s in spread.items()},
      "seconds_max": {name: s["max"] for name, s in spread.items()},
      "all_seconds": times,
      "seconds_per_shots": {
          name: {str(n): float(np.median([p[n] for p in v])) for n in shots}
          for name, v in shot_times.items()},
      "compile_and_first_run_seconds": compile_s,
      "speedups": {p: med[p] / med["ours"] for p in peers},
      "speedups_no_loo": {p: med[p] / med["ours_no_loo"] for p in peers},
      "same_l2": same_l2,
      "same_l2_fits": len(shots) * seeds,
      "same_l2_with_intercept": same_with_intercept,
      "loo_sq_margin": sq_margin,
      "agreement": agreement,
      # Float32 against float64 solvers: a near-tie may flip one example.
      # big_vision is left out: its float32 eigendecomposition with a bias
      # column of 100 (eigenvalue N·10⁴) loses the small eigenvalues' digits.
      "accuracies_within_one_example_except_big_vision": all(
          a["within_one_example"] for p, a in agreement.items()
          if p != "big_vision"),
      "mean_accuracy": {str(n): float(ours_acc[i].mean())
                        for i, n in enumerate(shots)},
      "loo_l2_per_shots": {str(n): l2s[ours_best[i]].tolist()
                           for i, n in enumerate(shots)},
      "loo_sq_l2_per_shots": {str(n): l2s[ours_sq[i]].tolist()
                              for i, n in enumerate(shots)},
      "ridgecv_l2_per_shots": ridgecv_l2,
  }
  if "ridge_classifier" in peers:
    a = agreement["ridge_classifier"]
    result.update(
        speedup=result["speedups"]["ridge_classifier"],
        speedup_no_loo=result["speedups_no_loo"]["ridge_classifier"],
        max_difference_in_test_examples=a["max_difference_in_test_examples"],
        fits_that_differ=a["fits_that_differ"])
  return result


def report(r):
  """Prints the result of `run` as a table."""
  s = r["setup"]
  print(f"few-shot ridge: {s['classes']} classes, D={s['dim']}, shots "
        f"{s['shots']}, {s['seeds']} seeds, {len(s['l2s'])} L2 values, "
        f"{s['test_examples']} test examples ({s['backend']}; seconds: "
        f"median [min-max] of {s['repeats']} interleaved runs)")
  names = {"ours": "ours: all L2 + LOO choice", "ours_no_loo":
           "ours without LOO", "ours_eigh": "ours: Gram + eigh alone", **PEERS}
  sec, lo, hi = r["seconds"], r["seconds_min"], r["seconds_max"]
  per = r["seconds_per_shots"]
  shots = [str(n) for n in s["shots"]]
  width = max(len(names[n]) for n in sec)
  print(f"  {'':<{width}}  {'median':>7}  {'min-max':>13}  " +
        " ".join(f"{n + '-shot':>7}" for n in shots) +
        "  peer/ours  peer/no-LOO")
  for n in sec:
    ratio = (f"  {r['speedups'][n]:8.1f}x  {r['speedups_no_loo'][n]:10.1f}x"
             if n in r["speedups"] else "")
    print(f"  {names[n]:<{width}}  {sec[n]:7.3f}  {lo[n]:6.3f}-{hi[n]:6.3f}  " +
          " ".join(f"{per[n][c]:7.3f}" for c in shots) + ratio)
  fits = r["same_l2_fits"]
  if r["same_l2"] or r["same_l2_with_intercept"] is not None:
    margin = r["loo_sq_margin"]
    margin = (f" (in every fit our second least is at least "
              f"{100 * margin:.2g}% above it)" if math.isfinite(margin) else "")
    print("  chosen L2 per (shots, seed) fit, RidgeCV's alpha_ against ours of "
          f"least LOO squared error{margin}:")
  for p, count in r["same_l2"].items():
    print(f"    {p}: the same L2 in {count} of {fits} fits, another in "
          f"{fits - count}")
  if r["same_l2_with_intercept"] is not None:
    count = r["same_l2_with_intercept"]
    print("    RidgeCV(eigen, fit_intercept=True), features without the bias "
          f"column: the same L2 in {count} of {fits} fits, another in "
          f"{fits - count}")
  print("  test accuracy against ours on the same training set and L2 "
        "(RidgeCV: at its chosen L2), in correctly classified test examples "
        f"of {s['test_examples']}:")
  for p, a in r["agreement"].items():
    n = a["fits_that_differ"]
    differ = (f"{n} differ{'s' if n == 1 else ''}, by at most "
              f"{a['max_difference_in_test_examples']} test example(s)"
              if a["fits_that_differ"] else "none differs")
    print(f"    {p}, {a['fits']} {a['fit']} fits: {differ}")
  others = [p for p in r["agreement"] if p != "big_vision"]
  if others:
    note = (" (big_vision not held to it: float32 round-off at small L2)"
            if "big_vision" in r["agreement"] else "")
    print(f"  {', '.join(others)}: within one test example of ours in every "
          f"fit: {r['accuracies_within_one_example_except_big_vision']}"
          f"{note}")
  means = ", ".join(f"{n}-shot {v:.3f}" for n, v in r["mean_accuracy"].items())
  print(f"  our mean test accuracy over seeds and L2 values: {means}")
