r"""Command line: few-shot linear evaluation of a checkpoint.

  python -m vit_jax.fewshot --workdir=DIR [--config=configs/fewshot.py[:arg]]
      [--floor]
  python -m vit_jax.fewshot --workdir=OUT --init=ViT-B_16.npz --model=B/16 \
      [--override=image_size=224 ...] [--config=configs/fewshot.py:paper]

The first form evaluates the newest checkpoint of a training workdir (model
rebuilt from DIR/config.json); the second a published-layout .npz with the
variant `--model` and field overrides. The few-shot config is `--config`, else
the run's `fewshot` field, else `evaluators.fewshot.default_config()`.

Prints a table headed by what was evaluated (representation, checkpoint and
step, or .npz): dataset x shots, mean ± std over seeds, with the L2 chosen by
leave-one-out and with the fixed L2 = 2^10. Writes, into DIR (or
--output_dir), files named after what they evaluated (`output_name`):

  fewshot_<representation>[_ema][_<source>][_<digest>].json and .png

`<source>` is the .npz's name with --init, or the workdir's name when
--output_dir is elsewhere; `<digest>` is 8 hex digits of the few-shot fields
that differ from `default_config()` (and of --model/--override with --init),
absent when none do. Another representation, config or checkpoint source
therefore never replaces an earlier result; re-running the same evaluation
(e.g. after more training steps) replaces its own files. The JSON holds
`{"representation", "source" ({"workdir", "step", "use_ema"} or {"init",
"model", "overrides"}; {} for pixels), "config" (every few-shot field),
"l2_at_grid_edge", "results": {dataset: {"<shots>": {"mean", "std", "l2",
...}}}, "environment" (the CPU and package versions it ran on)}`. The PNG
plots accuracy against shots on an axis spanning at least 10 points, with
the raw-pixel floor (representation "pixels", same few-shot fields) when
`--floor` computed it in this call or a `fewshot_pixels...json` of the same
fields is already in the output directory. Problems the user can
fix are printed as one line `error: <message>` and the exit status is 1.
"""

import hashlib
import json
import os
import re
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import cli_help
from vit_jax import config_utils
from vit_jax import environment
from vit_jax import errors
from vit_jax import model_source
from vit_jax import paths
from vit_jax.analysis import _plot

# Own flag namespace: importable beside other command-line modules.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Few-shot config: configs/fewshot.py[:arg].",
    lock_config=False, flag_values=FLAGS)
model_source.define_flags(FLAGS, "evaluate")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Write the fewshot_*.json and .png here instead of "
    "--workdir.", flag_values=FLAGS)
_FLOOR = flags.DEFINE_bool(
    "floor", False, "Also evaluate the raw pixels (representation 'pixels', "
    "the same few-shot fields; written as fewshot_pixels...) and draw them as "
    "the floor: seconds on small images such as the digits, costly at 224 px.",
    flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first.",
    flag_values=FLAGS)

# The few-shot fields that change what an evaluation computes (batch_size,
# progress and prefix do not); `output_name` digests those set otherwise than
# `default_config()`.
RESULT_FIELDS = ("datasets", "data_dir", "shots", "seeds", "l2_regs",
                 "fixed_l2", "image_size", "num_channels", "eps", "bias")


def _run_fewshot_config(run):
  """The few-shot entry of a training run's `evals`, if any."""
  for name, entry in dict(run.get("evals") or {}).items():
    entry = dict(entry or {})
    if (entry.get("type") or name) == "fewshot":
      return {k: v for k, v in entry.items() if k not in ("type", "every")}
  return None


def _normal(key, value):
  """A field's value in one spelling: (1, 5) and [1, 5], 1024 and 1024.0."""
  from vit_jax import sizes  # pylint: disable=g-import-not-at-top
  if value is None:
    return None
  if key in ("shots", "seeds"):
    return [int(v) for v in value]
  if key == "datasets":
    return [[str(v) for v in entry] for entry in value]
  if key in ("fixed_l2", "eps", "bias"):
    return float(value)
  if key == "image_size":
    return list(sizes.pair(value, "image_size"))
  if key == "num_channels":
    return int(value)
  return str(value)


def _fields(config):
  """The result fields of a resolved few-shot config, normalised; l2_regs is
  the grid searched (fixed_l2 included)."""
  out = {k: _normal(k, config.get(k)) for k in RESULT_FIELDS}
  out["l2_regs"] = sorted({float(v) for v in config.l2_regs}
                          | {float(config.fixed_l2)})
  return out


def _slug(text):
  return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def output_name(config, init=None, model_name=None, overrides=None,
                use_ema=False, workdir_name=None):
  """File name (no extension) of an evaluation's outputs.

  Args:
    config: the resolved few-shot config as given (before the model's image
      size is filled in).
    init: the .npz evaluated, if any.
    model_name: --model with --init.
    overrides: --override with --init.
    use_ema: the Polyak-averaged parameters were evaluated.
    workdir_name: the workdir's name, when the outputs go elsewhere.

  Returns:
    "fewshot_<representation>[_ema][_<source>][_<digest>]"; pixels depend on
    no model, so their name has neither "ema" nor a source.
  """
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  default = _fields(fewshot.default_config())
  differ = {k: v for k, v in _fields(config).items() if v != default[k]}
  parts = ["fewshot", _slug(config.representation)]
  if config.representation != fewshot.PIXELS:
    if use_ema:
      parts.append("ema")
    if init:
      parts.append(_slug(os.path.splitext(os.path.basename(init))[0]))
      differ["model"] = [model_name, dict(sorted((overrides or {}).items()))]
    elif workdir_name:
      parts.append(_slug(workdir_name))
  if differ:
    text = json.dumps(differ, sort_keys=True, default=str)
    parts.append(hashlib.sha256(text.encode()).hexdigest()[:8])
  return "_".join(parts)


def format_table(report, heading=None):
  """Dataset x shots table: mean ± std over seeds for both L2 choices."""
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  lines = [heading] if heading else []
  lines.append(f"{'dataset':<16} {'shots':>5}  {'LOO L2':>15}  "
               f"{'L2=2^10':>15}  chosen L2 per seed")
  for name, per_shots in report.items():
    for n, r in per_shots.items():
      chosen = " ".join(fewshot.power_of_two(v) for v in r["l2"])
      short = " (short classes)" if r.get("short_classes") else ""
      edge = " (grid edge)" if r.get("l2_at_grid_edge") else ""
      lines.append(
          f"{name:<16} {n:>5}  {r['mean']:>7.4f} ± {r['std']:.4f}  "
          f"{r['fixed_l2_mean']:>7.4f} ± {r['fixed_l2_std']:.4f}  "
          f"{chosen}{edge}{short}")
  return "\n".join(lines)


def y_limits(values, min_span=0.1):
  """Accuracy axis limits: at least `min_span` (10 points) wide, inside
  [0, 1], so that gaps of a tenth of a point do not look large."""
  lo, hi = _plot.span_at_least(min(values), max(values), min_span)
  pad = 0.03 * (hi - lo)
  return lo - pad, hi + pad


def plot(report, path, title="", floor=None):
  """Accuracy vs shots per dataset, error bars = std, both L2 choices, and
  the raw-pixel `floor` (a report of representation "pixels") if given."""
  plt = _plot.pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  names = list(report)
  fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4.0),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    shots = sorted(report[name], key=int)
    xs = [int(n) for n in shots]
    r = [report[name][n] for n in shots]
    # The two L2 choices a little apart, so that equal values stay visible.
    lines = [([x / 1.03 for x in xs], [v["mean"] for v in r],
              [v["std"] for v in r],
              dict(marker="o", label="L2 by leave-one-out")),
             ([x * 1.03 for x in xs], [v["fixed_l2_mean"] for v in r],
              [v["fixed_l2_std"] for v in r],
              dict(marker="s", linestyle="--", label="L2 = 2^10"))]
    floor_shots = [n for n in shots if n in (floor or {}).get(name, {})]
    if floor_shots:
      f = [floor[name][n] for n in floor_shots]
      lines.append(([int(n) for n in floor_shots], [v["mean"] for v in f],
                    [v["std"] for v in f],
                    dict(marker="^", linestyle=":", color="0.45",
                         label="raw pixels (floor), LOO L2")))
    values = []
    for x, means, stds, kw in lines:
      ax.errorbar(x, means, yerr=stds, capsize=3, **kw)
      values += [m - s for m, s in zip(means, stds)]
      values += [m + s for m, s in zip(means, stds)]
    ax.set_ylim(*y_limits(values))
    ax.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1, decimals=0))
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy")
    seeds = len(r[0].get("per_seed") or ())
    ax.set_title(f"{name}: mean ± std over {seeds} seeds" if seeds > 1
                 else name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _read_floor(path, report):
  """The results of a pixels JSON for the datasets of `report`, if any."""
  try:
    with open(path) as f:
      results = json.load(f).get("results") or {}
  except (OSError, ValueError, AttributeError):
    return None
  floor = {k: v for k, v in results.items() if k in report}
  return floor or None


def _write(output_dir, name, document, title, floor=None, log=print):
  """DIR/name.json and .png; says where they went (and what they replaced)."""
  path = os.path.join(output_dir, name + ".json")
  existed = os.path.exists(path)
  document = dict(document, environment=environment.describe())
  with open(path, "w") as f:
    json.dump(document, f, indent=2)
  plot(document["results"], os.path.join(output_dir, name + ".png"), title,
       floor=floor)
  again = (" (replacing the earlier result of this same evaluation)"
           if existed else "")
  log(f"wrote {path} and {name}.png{again}")


def evaluate(workdir, fewshot_config=None, init=None, model_name=None,
             overrides=None, use_ema=False, output_dir=None, floor=False,
             log=print):
  """Runs the evaluation; writes its .json and .png into `output_dir`.

  `output_dir` defaults to `workdir`; the files are named by `output_name`.
  With `floor`, the raw pixels are evaluated too (same fields), written as
  their own outputs, and drawn on the PNG.

  Returns:
    The report (see `evaluators.fewshot.Evaluator.report`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import fewshot  # pylint: disable=g-import-not-at-top
  output_dir = output_dir or workdir
  if init:
    config = fewshot.resolve_config(fewshot_config)
    image_size = config.get("image_size")
    if config.representation == fewshot.PIXELS:
      params, model = None, None
    else:
      params, model = model_source.load_npz_model(
          init, model_name, overrides or {}, image_size)
    mesh_spec = (("data", -1), ("model", 1))
    source = {"init": init, "model": model_name,
              "overrides": dict(overrides or {})}
    evaluated = f"{os.path.basename(init)} ({model_name})"
    title = f"{config.representation} of {os.path.basename(init)}"
  else:
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    params, model, run, step = checkpoint.model_from_workdir(
        workdir, use_ema, with_step=True)
    if fewshot_config is None:
      fewshot_config = _run_fewshot_config(run)
    config = fewshot.resolve_config(fewshot_config)
    mesh_spec = run.get("mesh") or (("data", -1), ("model", 1))
    if config.representation == fewshot.PIXELS:
      params, model = None, None
    source = {"workdir": workdir, "step": int(step), "use_ema": use_ema}
    ema = " (EMA)" if use_ema else ""
    evaluated = f"{workdir} step {step}{ema}"
    title = (f"{config.representation} of "
             f"{os.path.basename(os.path.normpath(workdir))}, step {step}{ema}")
  pixels = config.representation == fewshot.PIXELS
  if pixels:
    source, evaluated, title = {}, None, "raw pixels (no model)"
  elsewhere = not init and (os.path.abspath(output_dir) !=
                            os.path.abspath(workdir))
  name = output_name(
      config, init=init, model_name=model_name, overrides=overrides,
      use_ema=use_ema, workdir_name=os.path.basename(
          os.path.normpath(workdir)) if elsewhere else None)
  # The floor: the same fields on raw pixels, at the size given (if any).
  floor_config = config.copy_and_resolve_references()
  floor_config.representation = fewshot.PIXELS
  floor_name = output_name(floor_config)
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
    floor_report = None
    if floor and not pixels:
      floor_report = fewshot.Evaluator(None, mesh, log=log,
                                       **floor_config.to_dict()).report(None)
  except (ValueError, FileNotFoundError) as e:  # Config or missing data.
    raise errors.Error(str(e)) from None
  if jax.process_index() != 0:
    return report
  os.makedirs(output_dir, exist_ok=True)
  log(format_table(report, "few-shot linear evaluation of " + (
      "raw pixels (no model)" if pixels
      else f"{config.representation}: {evaluated}")))
  floor_path = os.path.join(output_dir, floor_name + ".json")
  if floor_report is not None:
    log(format_table(floor_report, "the raw-pixel floor (no model)"))
    _write(output_dir, floor_name, dict(
        representation=fewshot.PIXELS, source={},
        config=floor_config.to_dict(), l2_at_grid_edge=_at_edge(floor_report),
        results=floor_report), "few-shot: raw pixels (no model)", log=log)
  elif not pixels:
    floor_report = _read_floor(floor_path, report)
  _write(output_dir, name, dict(
      representation=config.representation, source=source,
      config=config.to_dict(), l2_at_grid_edge=_at_edge(report),
      results=report), f"few-shot: {title}", floor=floor_report, log=log)
  if not pixels:
    log(f"raw-pixel floor drawn from {floor_path}" if floor_report else
        "no raw-pixel floor drawn: pass --floor to compute it in this call")
  return report


def _at_edge(report):
  return any(r.get("l2_at_grid_edge") for per_shots in report.values()
             for r in per_shots.values())


@errors.command_line
def run(argv):
  """Runs the command line `argv`; returns the exit status."""
  if cli_help.requested(argv):
    return cli_help.show(argv, __doc__, FLAGS)
  config_utils.forget_config_overrides(FLAGS)
  FLAGS.unparse_flags()
  saved, sys.argv = sys.argv, list(argv)  # `--config.x` overrides read it.
  try:
    FLAGS(argv)
  finally:
    sys.argv = saved
  if not FLAGS.workdir:
    raise errors.Error("pass --workdir=DIR (a training workdir, or where to "
                       "write the results with --init)")
  logging.set_verbosity(logging.WARNING)
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  config = _CONFIG.value
  if config is not None:
    paths.absolute_config(config)
  evaluate(paths.absolute(FLAGS.workdir), config,
           init=paths.absolute(FLAGS.init), model_name=FLAGS.model,
           overrides=model_source.parse_overrides(FLAGS.override),
           use_ema=FLAGS.use_ema, output_dir=paths.absolute(_OUTPUT_DIR.value),
           floor=_FLOOR.value)


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
