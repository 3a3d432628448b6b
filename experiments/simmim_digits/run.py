"""SimMIM on the bundled digits: does masked-image pre-training help?

  python experiments/simmim_digits/run.py --root=/tmp/simmim_digits

For each seed (default 0, 1, 2):

1. pre-train `configs/simmim.py:digits` (no labels) -> ROOT/mim_<seed>;
2. (a) 10-shot linear accuracy (closed-form few-shot, `patch_mean`: the mean of
   the encoder's patch tokens) of the MIM encoder vs the same architecture at
   random initialisation (seed <seed>), few-shot samples of seeds 0, 1, 2;
3. (b) fine-tune `configs/digits.py` on 10% of the training labels
   (`train[:10%]`, 144 images) for the same number of steps from the MIM
   checkpoint (decoder and mask token dropped, layer decay 0.75) and from
   scratch -> ROOT/ft_mim_<seed>, ROOT/ft_scratch_<seed>; test accuracy on
   the 360 test images.

Every run goes through `python -m vit_jax.main` in its own process; a run
whose workdir already holds its final metrics is not run again (re-running
resumes). Writes ROOT/results.json, ROOT/results.jsonl (one row per seed
with the CPU and package versions it ran on) and prints the markdown table;
with --out=DIR also DIR/results.md, DIR/results.jsonl and
DIR/simmim_digits.png.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from vit_jax import environment

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
FT_STEPS = 300


def _final(workdir, key):
  """The last logged value of `key` in a workdir, or None."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  values = [r[key] for r in rows if key in r]
  return values[-1] if values else None


def _main(workdir, key, *args):
  """Runs `python -m vit_jax.main` unless `key` is already logged."""
  if _final(workdir, key) is None:
    start = time.time()
    cmd = [sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}",
           *args, "--config.progress=False"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT_DIR, check=True)
    print(f"  {time.time() - start:.0f} s", flush=True)
  return _final(workdir, key)


def _random_init_fewshot(mim_workdir, seed):
  """10-shot accuracy of `patch_mean` of the MIM architecture at init."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  _, model, config = checkpoint.model_from_workdir(mim_workdir)
  entry = dict(config.evals.fewshot)
  image = tuple(model.image_size)
  params = model.init({"params": jax.random.PRNGKey(seed)},
                      np.zeros((1, *image, model.num_channels), np.float32),
                      train=False)["params"]
  mesh = sharding.make_mesh((("data", -1), ("model", 1)))
  ev = fewshot.Evaluator(
      lambda p, x, **kw: model.apply({"params": p}, x, train=False, **kw),
      mesh, image_size=image, **{k: v for k, v in entry.items()
                                 if k not in ("type", "every")})
  return ev.run(params)["digits/10shot"]


def _stats(values):
  v = np.asarray(values, np.float64) * 100
  std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
  return f"{np.mean(v):.1f} ± {std:.1f}"


def table(results):
  seeds = sorted(results, key=int)
  col = lambda k: [results[s][k] for s in seeds]  # pylint: disable=unnecessary-lambda-assignment
  rows = [
      "| measure | from SimMIM | baseline | per seed (SimMIM / baseline) |",
      "|---|---|---|---|",
  ]
  for name, a, b in (
      ("(a) 10-shot linear, `patch_mean` (baseline: random init)",
       "fewshot_mim", "fewshot_random"),
      (f"(b) fine-tuned on 10% of the labels, {FT_STEPS} steps "
       "(baseline: from scratch)", "ft_mim", "ft_scratch")):
    per_seed = "; ".join(f"{results[s][a] * 100:.1f} / {results[s][b] * 100:.1f}"
                         for s in seeds)
    rows.append(f"| {name} | {_stats(col(a))} | {_stats(col(b))} | "
                f"{per_seed} |")
  ratios = col("ratio_to_baseline")
  rows.append(f"| masked L1 / mean-image baseline (test) | "
              f"{np.mean(ratios):.3f} ± {np.std(ratios, ddof=1) if len(ratios) > 1 else 0:.3f}"
              " | 1 | " + "; ".join(f"{r:.3f}" for r in ratios) + " |")
  return "\n".join(rows)


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  seeds = sorted(results, key=int)
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
  for ax, (title, a, b, lb) in zip(axes, (
      ("(a) 10-shot linear (patch_mean)", "fewshot_mim", "fewshot_random",
       "random init"),
      (f"(b) 10% labels, {FT_STEPS} steps", "ft_mim", "ft_scratch",
       "from scratch"))):
    for i, (key, label) in enumerate(((a, "from SimMIM"), (b, lb))):
      v = np.array([results[s][key] for s in seeds]) * 100
      ax.bar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0,
             capsize=4, color=("tab:blue", "tab:gray")[i])
      ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["from SimMIM", lb])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(
      prog="python experiments/simmim_digits/run.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="directory for the runs")
  p.add_argument("--seeds", default="0,1,2",
                 help="comma-separated seeds (default: %(default)s)")
  p.add_argument("--out", help="write results.md and the PNG here")
  args = p.parse_args()
  results = {}
  for seed in [int(s) for s in args.seeds.split(",")]:
    mim = os.path.join(args.root, f"mim_{seed}")
    r = {}
    r["fewshot_mim"] = _main(mim, "fewshot/digits/10shot",
                             "--config=configs/simmim.py:digits",
                             f"--config.seed={seed}")
    r["ratio_to_baseline"] = _final(mim, "reconstruction/ratio_to_baseline")
    r["fewshot_random"] = _random_init_fewshot(mim, seed)
    common = ["--config=configs/digits.py", f"--config.seed={seed}",
              "--config.train_split=train[:10%]",
              f"--config.total_steps={FT_STEPS}", "--config.optim.warmup_steps=30",
              "--config.evals.eval.every=0", "--config.evals.fewshot.every=-1"]
    r["ft_mim"] = _main(os.path.join(args.root, f"ft_mim_{seed}"),
                        "eval/accuracy", *common, f"--config.init={mim}",
                        "--config.optim.layer_decay=0.75")
    r["ft_scratch"] = _main(os.path.join(args.root, f"ft_scratch_{seed}"),
                           "eval/accuracy", *common)
    results[str(seed)] = r
    print(json.dumps({seed: r}), flush=True)
  with open(os.path.join(args.root, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  env = environment.describe()
  rows = "".join(json.dumps(dict(seed=int(s), **r, environment=env)) + "\n"
                 for s, r in results.items())
  with open(os.path.join(args.root, "results.jsonl"), "w") as f:
    f.write(rows)
  text = table(results)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.jsonl"), "w") as f:
      f.write(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
      f.write(text + "\n")
    plot(results, os.path.join(args.out, "simmim_digits.png"))


if __name__ == "__main__":
  main()
