"""Few-shot solver: our closed-form ridge against scikit-learn.

  python -m vit_jax.bench fewshot [--classes=100 --dim=768 --shots=1,5,10,25
      --seeds=5 --l2_exponents=-2,1,4,7,10,13,16,19 --test_per_class=10
      --repeats=3 --json]

Ours is `vit_jax/evaluators/ridge.py` (docs/design.md §6): one
eigendecomposition per (shots, seed) serving every L2 value, jitted and
vmapped over the seeds, timed warm, with and without the leave-one-out choice
of L2. scikit-learn is `RidgeClassifier(alpha=l2)` fitted once per
(shots, seed, l2) on the same whitened features. The features are synthetic
and class-clustered (class means ~ N(0, 0.3²), unit noise, float32), the shot
sets nested within a seed. The benchmark checks that the test accuracies of
the two agree (float32 near-ties may flip one test example).

Timings are the best of `--repeats` runs, the two sides interleaved, which is
robust against other load on the machine.
"""

import functools
import time
import warnings

from absl import flags

from vit_jax import bench

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
bench.define_output_flags(FLAGS, "Timed runs per side; the best counts.")


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
              test_per_class=f.test_per_class, repeats=f.repeats)


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


def run(*, classes, dim, shots, seeds, l2_exponents, test_per_class, repeats):
  """Few-shot ridge (ours) against scikit-learn, same features and splits.

  Returns:
    A JSON-serialisable dict: "setup", best "seconds" per side, the speedups,
    "accuracies_agree" and the details. Raises ValueError for bad input.
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

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import ridge  # pylint: disable=g-import-not-at-top

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

  def ours_fn(loo):
    ev = jax.jit(jax.vmap(
        functools.partial(ridge.evaluate, num_classes=k, loo=loo),
        in_axes=(0, 0, None, None, None)))

    def fit_all():
      out, per_shots = {}, {}
      for n in shots:
        start = time.perf_counter()
        idx = np.stack([rows[n, s] for s in range(seeds)])
        out[n] = jax.device_get(ev(pool[idx], pool_y[idx], test, test_y, l2s))
        per_shots[n] = time.perf_counter() - start
      return out, per_shots

    return fit_all

  def sklearn_fit_all():
    # Tiny L2 values on centred 1-shot features (kernel of rank N - 1) make
    # scikit-learn warn about ill-conditioning; its answers are still used.
    warnings.simplefilter("ignore", category=scipy.linalg.LinAlgWarning)
    acc = np.zeros((len(shots), seeds, len(l2s)))
    per_shots = {}
    for i, n in enumerate(shots):
      start = time.perf_counter()
      for s in range(seeds):
        x, y = pool[rows[n, s]], pool_y[rows[n, s]]
        mean, std = x.mean(0), x.std(0) + 1e-5
        xw, tw = (x - mean) / std, (test - mean) / std
        for j, l2 in enumerate(l2s):
          clf = linear_model.RidgeClassifier(alpha=float(l2)).fit(xw, y)
          acc[i, s, j] = np.mean(clf.predict(tw) == test_y)
      per_shots[n] = time.perf_counter() - start
    return acc, per_shots

  ours, ours_no_loo = ours_fn(loo=True), ours_fn(loo=False)
  compile_s, _ = _timed(ours)
  ours_no_loo()
  times = {"ours": [], "ours_no_loo": [], "sklearn": []}
  shot_times = {"ours": [], "sklearn": []}
  for _ in range(repeats):
    t, (out, per_shots) = _timed(ours)
    times["ours"].append(t)
    shot_times["ours"].append(per_shots)
    times["ours_no_loo"].append(_timed(ours_no_loo)[0])
    t, (sk_acc, per_shots) = _timed(sklearn_fit_all)
    times["sklearn"].append(t)
    shot_times["sklearn"].append(per_shots)
  shot_best = {name: {str(n): min(p[n] for p in v) for n in shots}
               for name, v in shot_times.items()}
  ours_acc = np.stack([out[n]["accuracy"] for n in shots])
  # Differences in numbers of correctly classified test examples.
  diff = np.rint(np.abs(ours_acc - sk_acc) * len(test_y)).astype(int)
  best = {name: min(v) for name, v in times.items()}
  chosen = np.stack([l2s[out[n]["best"]] for n in shots])
  return {
      "setup": dict(classes=k, dim=d, shots=shots, seeds=seeds,
                    l2s=l2s.tolist(), test_examples=len(test_y),
                    fits=len(shots) * seeds * len(l2s),
                    eigendecompositions=len(shots) * seeds,
                    backend=jax.default_backend(),
                    devices=jax.device_count(), repeats=repeats),
      "seconds": best,
      "all_seconds": times,
      "seconds_per_shots": shot_best,
      "compile_and_first_run_seconds": compile_s,
      "speedup": best["sklearn"] / best["ours"],
      "speedup_no_loo": best["sklearn"] / best["ours_no_loo"],
      "max_difference_in_test_examples": int(diff.max()),
      "fits_that_differ": int((diff > 0).sum()),
      # Float32 against scikit-learn's solver: a near-tie may flip.
      "accuracies_agree": bool(diff.max() <= 1),
      "mean_accuracy": {str(n): float(ours_acc[i].mean())
                        for i, n in enumerate(shots)},
      "loo_l2_per_shots": {str(n): chosen[i].tolist()
                           for i, n in enumerate(shots)},
  }


def report(r):
  """Prints the result of `run` as a table."""
  s = r["setup"]
  print(f"few-shot ridge: {s['classes']} classes, D={s['dim']}, shots "
        f"{s['shots']}, {s['seeds']} seeds, {len(s['l2s'])} L2 values, "
        f"{s['test_examples']} test examples ({s['backend']}, best of "
        f"{s['repeats']})")
  sec = r["seconds"]
  print(f"  ours, {s['eigendecompositions']} eigendecompositions, all L2 + "
        f"leave-one-out choice: {sec['ours']:.3f} s")
  print("  ours, same without leave-one-out:        "
        f"{sec['ours_no_loo']:.3f} s")
  print(f"  scikit-learn RidgeClassifier, {s['fits']} fits:  "
        f"{sec['sklearn']:.3f} s")
  print(f"  speedup: {r['speedup']:.1f}x (without leave-one-out "
        f"{r['speedup_no_loo']:.1f}x)")
  per = r["seconds_per_shots"]
  print("  per shot count (ours incl. leave-one-out / scikit-learn): " +
        ", ".join(f"{n}-shot {per['ours'][n]:.3f}/{per['sklearn'][n]:.3f} s"
                  for n in per["ours"]))
  print(f"  accuracies agree: {r['accuracies_agree']} ({r['fits_that_differ']}"
        f" of {s['fits']} fits differ, by at most "
        f"{r['max_difference_in_test_examples']} test example(s))")
  means = ", ".join(f"{n}-shot {v:.3f}" for n, v in r["mean_accuracy"].items())
  print(f"  mean test accuracy over seeds and L2: {means}")
