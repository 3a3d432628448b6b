"""Runs the points of a sweep through `vit_jax.main` and tabulates them.

  python -m vit_jax.sweep --config=experiments/<name>/sweep.py --workdir=ROOT
  python -m vit_jax.sweep ... --list          # the points, numbered
  python -m vit_jax.sweep ... --point=3       # only point 3 (one job each)
  python -m vit_jax.sweep ... --collect       # only gather the table
  python -m vit_jax.sweep ... --set=data_dir=/data/tfds  # for every point

A sweep file defines `get_sweep()` returning a dict with

- `settings`: a list of dicts `{"name": str, "config": "configs/x.py[:arg]",
  "overrides": {"field.sub": value, ...}}`, and optionally `"point"`: the
  points' directory under ROOT (default: the name made directory-safe; a
  path such as `other_study/setting` reuses another sweep's points);
- `seeds`: seeds every setting is run with (`--config.seed`);
  String values may name `{root}` (the sweep's ROOT) and `{seed}`, e.g.
  `"init": "{root}/pretrain_s{seed}"` fine-tunes the same seed's point of an
  earlier setting (points run in the order listed, so list it first; with
  `--point`, run those points first);
- `metrics` (optional): the metric keys of the table, e.g.
  `["eval/accuracy", "fewshot/digits/10shot"]` (default: every evaluator
  metric of the last logged step);
- `report` (optional): `report(rows, root) -> str`, called after the table
  with the finished points' rows (as in results.jsonl); it may write PNGs
  into ROOT and returns markdown appended to results.md.

Point `<setting>_s<seed>` trains in `ROOT/<point>/` as `python -m vit_jax.main
--config=... --config.seed=S --config.<k>=<v> ...`; a point whose workdir
holds `sweep_done.json` is skipped, and an interrupted one resumes from its
newest checkpoint (`main` does that by itself). At the end (and with
`--collect`) `ROOT/results.jsonl` holds one row per finished point (its
metrics, wall time, and the CPU and package versions it ran on:
`vit_jax.environment`) and `ROOT/results.md` the table: mean ± std over seeds
per setting (std with ddof=1), printed too. `ROOT/curves.png` overlays the
training curves of every point that logged metrics, a colour per setting
(`vit_jax.analysis.curves`).
"""

import importlib.util
import json
import math
import os
import re
import sys
import time

from absl import flags

from vit_jax import cli_help
from vit_jax import compilation_cache
from vit_jax import environment
from vit_jax import errors
from vit_jax import paths
from vit_jax.analysis import curves

FLAGS = flags.FlagValues()
flags.DEFINE_string("config", None, "Sweep file (defines get_sweep()).",
                    flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Root directory of the points.",
                    flag_values=FLAGS)
flags.DEFINE_integer("point", None, "Run only this point (see --list).",
                     flag_values=FLAGS)
flags.DEFINE_bool("collect", False, "Only gather results.jsonl/results.md.",
                  flag_values=FLAGS)
flags.DEFINE_multi_string(
    "set", [], "KEY=VALUE: one more config override for every point, e.g. "
    "--set=data_dir=/data/tfds (repeatable).", flag_values=FLAGS)
flags.DEFINE_bool("list", False, "Print the numbered points and exit.",
                  flag_values=FLAGS)

DONE = "sweep_done.json"


def slug(text):
  """A directory-safe name: `gap lr=1e-3` -> `gap_lr-1e-3`."""
  return re.sub(r"[^A-Za-z0-9.+-]+", "_", text.replace("=", "-")).strip("_")


def load_sweep(path):
  """The sweep dict of a sweep file, checked."""
  if not os.path.isfile(path):
    raise errors.Error(f"sweep file {path} not found: pass "
                       "--config=experiments/<name>/sweep.py")
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  if spec is None or not path.endswith(".py"):
    raise errors.Error(f"sweep file {path} is not a Python file: pass a .py "
                       "file that defines get_sweep()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (SyntaxError, ImportError) as e:
    raise errors.Error(f"cannot load sweep file {path}: {e}") from None
  if not hasattr(module, "get_sweep"):
    raise errors.Error(f"{path} defines no get_sweep()")
  sweep = dict(module.get_sweep())
  settings = list(sweep.get("settings") or ())
  if not settings:
    raise errors.Error(f"{path}: get_sweep() lists no settings")
  names = [s.get("name") for s in settings]
  if None in names or len(set(map(slug, names))) != len(names):
    raise errors.Error(f"{path}: every setting needs a distinct name, got "
                       f"{names}")
  for s in settings:
    if not s.get("config"):
      raise errors.Error(f"{path}: setting {s['name']!r} has no config")
  sweep["settings"] = settings
  sweep["seeds"] = tuple(int(x) for x in sweep.get("seeds", (0,)))
  return sweep


def points(sweep):
  """[(point name, setting, seed)] in a fixed order: settings, then seeds."""
  return [(f"{s.get('point') or slug(s['name'])}_s{seed}", s, seed)
          for s in sweep["settings"] for seed in sweep["seeds"]]


def _flag_value(value):
  if isinstance(value, str):
    return value
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def argv(setting, seed, workdir, root):
  """The `vit_jax.main` command line of one point (`root`: the sweep's ROOT,
  what `{root}` in the overrides names)."""
  args = ["vit_jax.main", f"--config={setting['config']}",
          f"--workdir={workdir}", f"--config.seed={seed}"]
  for key, value in dict(setting.get("overrides") or {}).items():
    value = _flag_value(value).replace("{root}", root)
    args.append(f"--config.{key}={value.replace('{seed}', str(seed))}")
  return args


def _read_metrics(workdir):
  """The rows of DIR/metrics.jsonl ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def final_metrics(workdir, rows=None):
  """Last logged value of every metric in DIR/metrics.jsonl."""
  out = {}
  for row in _read_metrics(workdir) if rows is None else rows:
    out.update(row)
  out.pop("step", None)
  return out


def _finished(workdir, rows=None):
  """Whether the run logged its last step (config.json's total_steps)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      total = json.load(f)["resolved"]["total_steps"]
    rows = _read_metrics(workdir) if rows is None else rows
  except (OSError, KeyError, ValueError):
    return False
  return max((r.get("step", 0) for r in rows), default=0) >= total


def run_point(name, setting, seed, root, log=print):
  """Trains one point unless it is done; returns its final metrics."""
  from vit_jax import main  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, name)
  done = os.path.join(workdir, DONE)
  if os.path.exists(done):
    log(f"{name}: done, skipped")
    with open(done) as f:
      return json.load(f)["metrics"]
  args = argv(setting, seed, workdir, root)
  log(f"{name}: python -m {' '.join(args)}")
  start = time.time()
  if main.run(args) != 0:
    raise errors.Error(f"point {name} failed (see the error above); fix it "
                       "and run the sweep again: finished points are kept")
  rows = _read_metrics(workdir)
  metrics = final_metrics(workdir, rows)
  if not _finished(workdir, rows):  # Stopped by a signal: checkpointed, not done.
    raise errors.Error(f"point {name} stopped before its last step; run the "
                       "sweep again to resume it")
  with open(done + ".tmp", "w") as f:
    json.dump({"point": name, "setting": setting["name"], "seed": seed,
               "seconds": time.time() - start, "metrics": metrics,
               "environment": environment.describe()}, f,
              indent=2)
  os.replace(done + ".tmp", done)
  log(f"{name}: finished in {time.time() - start:.0f} s")
  return metrics


def mean_std(values):
  """Mean and standard deviation (ddof=1; 0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
  return mean, std


def format_cell(mean, std, n):
  """A table cell: "mean ± std", values in [0, 1] (accuracies) in %."""
  scale = 100.0 if abs(mean) <= 1.0 else 1.0
  return f"{mean * scale:.1f} ± {std * scale:.1f}" + ("" if n > 1 else " (1 seed)")


def collect(sweep, root):
  """Writes ROOT/results.jsonl and ROOT/results.md; returns the table."""
  rows = []
  for name, setting, seed in points(sweep):
    done = os.path.join(root, name, DONE)
    if os.path.exists(done):
      with open(done) as f:  # This sweep's names (a point may be shared).
        rows.append(dict(json.load(f), point=name, setting=setting["name"]))
  with open(os.path.join(root, "results.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  keys = list(sweep.get("metrics") or sorted(
      {k for r in rows for k in r["metrics"]
       if not k.startswith(("train/", "perf/", "data/"))}))
  lines = ["| setting | seeds | " + " | ".join(keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for setting in sweep["settings"]:
    mine = [r for r in rows if r["setting"] == setting["name"]]
    cells = []
    for key in keys:
      values = [float(r["metrics"][key]) for r in mine if key in r["metrics"]]
      cells.append(format_cell(*mean_std(values), len(values)) if values else "–")
    lines.append(f"| {setting['name']} | {len(mine)} | " + " | ".join(cells)
                 + " |")
  table = "\n".join(lines)
  note = ("Values in [0, 1] (accuracies) are shown in %; mean ± std over "
          "seeds (ddof=1).")
  text = table + "\n\n" + note + "\n"
  if sweep.get("report") and rows:
    text += "\n" + sweep["report"](rows, root).strip() + "\n"
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(text)
  logged = [(name, os.path.join(root, name), setting["name"])
            for name, setting, _ in points(sweep)
            if curves.has_metrics(os.path.join(root, name))]
  if logged:
    curves.write_safely(root, runs=logged, title=(
        f"{os.path.basename(root)}: {len(logged)} points"))
  return text


def _compilation_cache(root):
  """Points share compiled steps through a persistent cache in ROOT/.jax_cache
  (unless JAX_COMPILATION_CACHE_DIR names another): the settings of a sweep
  often compile the same functions, and compiling dominates short points."""
  compilation_cache.setup(default=os.path.join(root, ".jax_cache"))


@errors.command_line
def run(argv_):
  """The command line; returns the exit status."""
  if cli_help.requested(argv_):
    return cli_help.show(argv_, __doc__, FLAGS)
  FLAGS.unparse_flags()
  FLAGS(argv_)
  if not FLAGS.config or not FLAGS.workdir:
    raise errors.Error("pass --config=experiments/<name>/sweep.py and "
                       "--workdir=ROOT")
  FLAGS.workdir = paths.absolute(FLAGS.workdir)
  extra = {}
  for item in FLAGS.set:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise errors.Error(f"--set={item} is not KEY=VALUE: e.g. "
                         "--set=data_dir=/data/tfds")
    extra[key.removeprefix("config.")] = value
  sweep = load_sweep(FLAGS.config)
  for setting in sweep["settings"]:
    setting["overrides"] = dict(setting.get("overrides") or {}, **extra)
  todo = points(sweep)
  if FLAGS.list:
    for k, (name, setting, seed) in enumerate(todo):
      print(f"{k}\t{name}\t"
            f"{' '.join(argv(setting, seed, '...', 'ROOT')[1:])}")
    return 0
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.point is not None:
    if not 0 <= FLAGS.point < len(todo):
      raise errors.Error(f"--point={FLAGS.point} is not in [0, {len(todo)}):"
                         " see --list")
    todo = [todo[FLAGS.point]]
  if not FLAGS.collect:
    _compilation_cache(FLAGS.workdir)
    for k, (name, setting, seed) in enumerate(todo):
      print(f"[{k + 1}/{len(todo)}] ", end="")
      run_point(name, setting, seed, FLAGS.workdir)
  if FLAGS.point is None or FLAGS.collect:
    print(collect(sweep, FLAGS.workdir))
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
