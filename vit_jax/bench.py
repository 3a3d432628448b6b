"""Benchmarks of vit_jax against its peers, printed side by side.

  python -m vit_jax.bench --fewshot [--fewshot_classes=100 --fewshot_dim=768]
      [--repeats=3] [--json=FILE]

Each mode is a function `(flags) -> dict` registered in `MODES` under the name
of its boolean flag; `main` runs every mode whose flag is set, prints its
report and, with `--json=FILE`, writes all results there.

Modes:
  --fewshot  closed-form few-shot ridge (`evaluators/ridge.py`: one
             eigendecomposition per (shots, seed) serving every L2 value,
             jitted, warm) against scikit-learn's `RidgeClassifier(alpha=l2)`
             fitted once per (shots, seed, l2), on synthetic class-clustered
             features. Checks that the test accuracies agree.

Timings are the best of `--repeats` runs (the two sides interleaved), which is
robust against other load on the machine.
"""

import functools
import json
import sys
import time
import warnings

from absl import flags

# Own flag namespace: importable beside other command-line modules.
FLAGS = flags.FlagValues()
_FEWSHOT = flags.DEFINE_bool(
    "fewshot", False, "Few-shot ridge against scikit-learn RidgeClassifier.",
    flag_values=FLAGS)
_CLASSES = flags.DEFINE_integer(
    "fewshot_classes", 100, "Few-shot: number of classes.", flag_values=FLAGS)
_DIM = flags.DEFINE_integer(
    "fewshot_dim", 768, "Few-shot: feature dimension.", flag_values=FLAGS)
_SHOTS = flags.DEFINE_list(
    "fewshot_shots", ["1", "5", "10", "25"], "Few-shot: shots per class.",
    flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer(
    "fewshot_seeds", 5, "Few-shot: seeds per shot count.", flag_values=FLAGS)
_L2S = flags.DEFINE_list(
    "fewshot_l2_exponents", ["-2", "1", "4", "7", "10", "13", "16", "19"],
    "Few-shot: the L2 values are 2 to these powers.", flag_values=FLAGS)
_TEST_PER_CLASS = flags.DEFINE_integer(
    "fewshot_test_per_class", 10, "Few-shot: test examples per class.",
    flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed runs per side; the best counts.", flag_values=FLAGS)
_JSON = flags.DEFINE_string(
    "json", None, "Write the results to this file.", flag_values=FLAGS)


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


def fewshot(f):
  """Few-shot ridge (ours) against scikit-learn, same features and splits."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import ridge  # pylint: disable=g-import-not-at-top

  k, d, seeds = f.fewshot_classes, f.fewshot_dim, f.fewshot_seeds
  shots = [int(s) for s in f.fewshot_shots]
  l2s = np.array([2.0**float(e) for e in f.fewshot_l2_exponents], np.float32)
  rng = np.random.default_rng(0)
  pool_size = max(shots)
  (pool, pool_y), sample = _clustered_features(rng, k, d, pool_size)
  test, test_y = sample(f.fewshot_test_per_class)
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

    def run():
      out, per_shots = {}, {}
      for n in shots:
        start = time.perf_counter()
        idx = np.stack([rows[n, s] for s in range(seeds)])
        out[n] = jax.device_get(ev(pool[idx], pool_y[idx], test, test_y, l2s))
        per_shots[n] = time.perf_counter() - start
      return out, per_shots

    return run

  def sklearn_run():
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

  ours, ours_fit = ours_fn(loo=True), ours_fn(loo=False)
  compile_s, _ = _timed(ours)
  ours_fit()
  times = {"ours": [], "ours_no_loo": [], "sklearn": []}
  shot_times = {"ours": [], "sklearn": []}
  for _ in range(f.repeats):
    t, (out, per_shots) = _timed(ours)
    times["ours"].append(t)
    shot_times["ours"].append(per_shots)
    times["ours_no_loo"].append(_timed(ours_fit)[0])
    t, (sk_acc, per_shots) = _timed(sklearn_run)
    times["sklearn"].append(t)
    shot_times["sklearn"].append(per_shots)
  shot_best = {name: {str(n): min(p[n] for p in v) for n in shots}
               for name, v in shot_times.items()}
  ours_acc = np.stack([out[n]["accuracy"] for n in shots])
  # Differences in numbers of correctly classified test examples.
  diff = np.rint(np.abs(ours_acc - sk_acc) * len(test_y)).astype(int)
  best = {name: min(v) for name, v in times.items()}
  chosen = np.stack([l2s[out[n]["best"]] for n in shots])
  result = {
      "setup": dict(classes=k, dim=d, shots=shots, seeds=seeds,
                    l2s=l2s.tolist(), test_examples=len(test_y),
                    fits=len(shots) * seeds * len(l2s),
                    eigendecompositions=len(shots) * seeds,
                    backend=jax.default_backend(),
                    devices=jax.device_count(), repeats=f.repeats),
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
  return result


def _print_fewshot(r):
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


MODES = {"fewshot": (fewshot, _print_fewshot)}


def main(argv=None):
  """Runs the selected benchmarks; returns the exit status."""
  f = FLAGS
  f.unparse_flags()
  try:
    f(sys.argv if argv is None else argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  selected = [name for name in MODES if f[name].value]
  if not selected:
    print("error: choose a benchmark: " +
          " ".join(f"--{name}" for name in MODES), file=sys.stderr)
    return 1
  results = {}
  for name in selected:
    run, show = MODES[name]
    results[name] = run(f)
    show(results[name])
  if _JSON.value:
    with open(_JSON.value, "w") as fp:
      json.dump(results, fp, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
