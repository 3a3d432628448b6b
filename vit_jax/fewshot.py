r"""Command line: few-shot linear evaluation of a checkpoint.

  python -m vit_jax.fewshot --workdir=DIR [--config=configs/fewshot.py[:arg]]
  python -m vit_jax.fewshot --workdir=OUT --init=ViT-B_16.npz --model=B/16 \
      [--override=image_size=224 ...] [--config=configs/fewshot.py:paper]

The first form evaluates the newest checkpoint of a training workdir (model
rebuilt from DIR/config.json); the second a published-layout .npz with the
variant `--model` and field overrides. The few-shot config is `--config`, else
the run's `fewshot` field, else `evaluators.fewshot.default_config()`.

Prints a table (dataset x shots, mean ± std over seeds, with the L2 chosen by
leave-one-out and with the fixed L2 = 2^10) and writes DIR/fewshot.json
(`{dataset: {"<shots>": {"mean", "std", "l2", "fixed_l2_mean", ...}}}`) and
the plot DIR/fewshot.png (or into --output_dir). Problems the user can fix
are printed as one line `error: <message>` and the exit status is 1.
"""

import json
import math
import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import cli_help
from vit_jax import errors
from vit_jax import model_source
from vit_jax import paths

# Own flag namespace: importable beside other command-line modules.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Few-shot config: configs/fewshot.py[:arg].",
    lock_config=False, flag_values=FLAGS)
model_source.define_flags(FLAGS, "evaluate")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Write fewshot.json and fewshot.png here instead of "
    "--workdir.", flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first.",
    flag_values=FLAGS)


def _run_fewshot_config(run):
  """The few-shot entry of a training run's `evals`, if any."""
  for name, entry in dict(run.get("evals") or {}).items():
    entry = dict(entry or {})
    if (entry.get("type") or name) == "fewshot":
      return {k: v for k, v in entry.items() if k not in ("type", "every")}
  return None


def format_table(report):
  """Dataset x shots table: mean ± std over seeds for both L2 choices."""
  lines = [f"{'dataset':<16} {'shots':>5}  {'LOO L2':>15}  "
           f"{'L2=2^10':>15}  chosen L2 per seed"]
  for name, per_shots in report.items():
    for n, r in per_shots.items():
      chosen = " ".join(f"2^{math.log2(v):g}" for v in r["l2"])
      short = " (short classes)" if r.get("short_classes") else ""
      lines.append(
          f"{name:<16} {n:>5}  {r['mean']:>7.4f} ± {r['std']:.4f}  "
          f"{r['fixed_l2_mean']:>7.4f} ± {r['fixed_l2_std']:.4f}  "
          f"{chosen}{short}")
  return "\n".join(lines)


def plot(report, path, title=""):
  """Accuracy vs shots per dataset, error bars = std, both L2 choices."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(report)
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    shots = sorted(report[name], key=int)
    xs = [int(n) for n in shots]
    r = [report[name][n] for n in shots]
    ax.errorbar(xs, [v["mean"] for v in r], yerr=[v["std"] for v in r],
                marker="o", capsize=3, label="L2 by leave-one-out")
    ax.errorbar(xs, [v["fixed_l2_mean"] for v in r],
                yerr=[v["fixed_l2_std"] for v in r], marker="s", capsize=3,
                linestyle="--", label="L2 = 2^10")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{name} {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate(workdir, fewshot_config=None, init=None, model_name=None,
             overrides=None, use_ema=False, output_dir=None, log=print):
  """Runs the evaluation; writes fewshot.json/.png into `output_dir`.

  `output_dir` defaults to `workdir`.

  Returns:
    The report (see `evaluators.fewshot.Evaluator.report`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  if init:
    config = fewshot.resolve_config(fewshot_config)
    image_size = config.get("image_size")
    if config.representation == fewshot.PIXELS:
      params, model = None, None
    else:
      params, model = model_source.load_npz_model(
          init, model_name, overrides or {}, image_size)
    mesh_spec = (("data", -1), ("model", 1))
  else:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    params, model, run = checkpoint.model_from_workdir(workdir, use_ema)
    if fewshot_config is None:
      fewshot_config = _run_fewshot_config(run)
    config = fewshot.resolve_config(fewshot_config)
    mesh_spec = run.get("mesh") or (("data", -1), ("model", 1))
    if config.representation == fewshot.PIXELS:
      params, model = None, None
  mesh = sharding.make_mesh(mesh_spec)
  if model is not None and config.get("image_size") is None:
    config.image_size = model.image_size
  predict_fn = None if model is None else (
      lambda p, x, **kw: model.apply({"params": p}, x, train=False, **kw))
  try:
    evaluator = fewshot.Evaluator(predict_fn, mesh, log=log,
                                  **config.to_dict())
    for what, files in evaluator.skipped.items():
      log(data.skipped_warning(files, what, hint=None))
    report = evaluator.report(params)
  except (ValueError, FileNotFoundError) as e:  # Config or missing data.
    raise errors.Error(str(e)) from None
  if jax.process_index() == 0:
    log(format_table(report))
    output_dir = output_dir or workdir
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "fewshot.json")
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
    plot(report, os.path.join(output_dir, "fewshot.png"),
         title=f"({config.representation})")
    log(f"wrote {path} and fewshot.png")
  return report


@errors.command_line
def run(argv):
  """Runs the command line `argv`; returns the exit status."""
  if cli_help.requested(argv):
    return cli_help.show(argv, __doc__, FLAGS)
  FLAGS.unparse_flags()
  saved, sys.argv = sys.argv, list(argv)  # `--config.x` overrides read it.
  try:
    FLAGS(argv)
  finally:
    sys.argv = saved
  if not FLAGS.workdir:
    raise errors.Error("pass --workdir=DIR (a training workdir, or where to "
                       "write fewshot.json with --init)")
  logging.set_verbosity(logging.WARNING)
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  config = _CONFIG.value
  if config is not None:
    paths.absolute_config(config)
  evaluate(paths.absolute(FLAGS.workdir), config,
           init=paths.absolute(FLAGS.init), model_name=FLAGS.model,
           overrides=model_source.parse_overrides(FLAGS.override),
           use_ema=FLAGS.use_ema, output_dir=paths.absolute(_OUTPUT_DIR.value))


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
