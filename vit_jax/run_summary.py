"""What a training run prints: its evaluations, and one block at its end.

Every evaluation prints one line per evaluator (`step 300: eval/accuracy=0.9861
eval/loss=0.1734 ...`), or the table of an evaluator that formats its own
metrics: an evaluator may define `format_lines(metrics) -> [str]`, a caption
then the table's lines (the few-shot evaluator does).

The end of a run prints an aligned block on process 0:

    run summary: 600 of 600 steps
      eval        accuracy=0.9889 loss=0.2079 num_correct=356 num_examples=360
      fewshot     pre_logits, 3 seeds: mean ± std; L2 chosen by leave-one-out
                  dataset  shots  accuracy         L2    at L2=2^10
                  digits       1  0.9889 ± 0.0028  2^5   0.9880 ± 0.0016
      time        61.2 s: setup 5.2 s, training 52.3 s, evaluation 2.6 s, ...
      XLA         compiled 3 programs in 0.2 s, loaded 9 from the compilation ...
      checkpoint  /tmp/digits/checkpoints/600
      next        python -m vit_jax.fewshot --workdir=/tmp/digits
                  python -m vit_jax.convert --from=/tmp/digits --to=hf ...

(the final metrics of every evaluator, EMA ones as `ema/<name>`; the wall
time of the run's phases and XLA's compilations; the newest checkpoint; the
commands to run next on the workdir, those the model can take). A run
stopped by a signal prints a shorter block: where it stopped, the checkpoint
and how to resume.
"""

import os
import shlex

from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax.convert import bit as bit_lib
from vit_jax.convert import core
from vit_jax.convert import hf as hf_lib
from vit_jax.convert import timm as timm_lib


def short(metrics):
  """`k=v ...` in natural key order; integers without decimals."""
  parts = []
  for k, v in sorted(metrics.items(),
                     key=lambda kv: metrics_lib.natural_key(kv[0])):
    v = float(v)
    parts.append(f"{k}={int(v)}" if v.is_integer() and abs(v) >= 1
                 else f"{k}={v:.4f}")
  return " ".join(parts)


def _table(evaluator, metrics):
  """The evaluator's own lines for `metrics` (caption first), or None."""
  format_lines = getattr(evaluator, "format_lines", None)
  lines = list(format_lines(metrics)) if format_lines is not None else []
  return lines or None


def step_lines(step, label, evaluator, metrics):
  """What an evaluation at `step` prints for one evaluator.

  Args:
    step: the training step.
    label: the metrics' prefix (`eval`, `ema/fewshot`).
    evaluator: the evaluator (its `format_lines`, if any, is used).
    metrics: what its `run` returned.

  Returns:
    One line `step N: label/k=v ...`, or `step N: label: caption` and the
    evaluator's table indented.
  """
  table = _table(evaluator, metrics)
  if table is None:
    return [f"step {step}: "
            + short({f"{label}/{k}": v for k, v in metrics.items()})]
  return [f"step {step}: {label}: {table[0]}"] + [f"  {l}" for l in table[1:]]


def duration(seconds):
  """`41.2 s` under 100 s, else `H:MM:SS`."""
  if seconds < 100:
    return f"{seconds:.1f} s"
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _render(head, rows):
  """`head`, then each (label, lines) row: the label in an aligned column
  beside its first line, the other lines under that one."""
  width = max(len(label) for label, _ in rows)
  out = [head]
  for label, lines in rows:
    out.append(f"  {label:<{width}}  {lines[0]}")
    out += [f"  {'':<{width}}  {l}" for l in lines[1:]]
  return out


def _time_rows(times):
  """The `time` and `XLA` rows from `train._Clock.totals()`."""
  phases = ", ".join(f"{name} {duration(s)}"
                     for name, s in times["phases"].items())
  compiled = times["compiled"]
  xla = (f"compiled {compiled} program{'' if compiled == 1 else 's'} in "
         f"{duration(times['compile_seconds'])}")
  if times["loaded"]:
    xla += (f", loaded {times['loaded']} from the compilation cache in "
            f"{duration(times['load_seconds'])}")
  return [("time", [f"{duration(times['total'])}: {phases}"]),
          ("XLA", [xla])]


def newest_checkpoint(workdir):
  """DIR/checkpoints/<newest step>, or None without one."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in (os.listdir(directory) if os.path.isdir(directory)
                            else ()) if d.isdigit()]
  return os.path.join(directory, str(max(steps))) if steps else None


def _expressible(check):
  try:
    check()
  except (core.Unsupported, ValueError):
    return False
  return True


def _convert_outputs(model, workdir):
  """{target: --out} for the targets `python -m vit_jax.convert` can write
  for `model` (the .npz when neither PyTorch target can)."""
  if isinstance(model, models.BiT):
    ok = _expressible(lambda: bit_lib.check_expressible(model))
    return {"timm": os.path.join(workdir, "timm.safetensors")} if ok else {}
  cfg = core.full_config({k: getattr(model, k) for k in models.FIELDS})
  out = {}
  if _expressible(lambda: hf_lib.config_dict(cfg, hf_lib.architecture(cfg))):
    out["hf"] = os.path.join(workdir, "hf")
  if _expressible(lambda: timm_lib.check(cfg)):
    out["timm"] = os.path.join(workdir, "timm")
  # Neither can hold it (relative position bias, a hybrid stem): the .npz.
  return out or {"npz": os.path.join(workdir, "model.npz")}


def next_commands(workdir, model):
  """The commands to run next on a trained workdir, paths filled in."""
  q = shlex.quote(workdir)
  commands = [f"python -m vit_jax.fewshot --workdir={q}"]
  for target, out in _convert_outputs(model, workdir).items():
    commands.append(f"python -m vit_jax.convert --from={q} --to={target} "
                    f"--out={shlex.quote(out)}")
  if not isinstance(model, models.BiT):  # The analyses read attention.
    commands.append(f"python -m vit_jax.analyze --workdir={q}")
  return commands


def final(workdir, step, total_steps, evaluated, times, model, start_step=0):
  """The block printed at the end of a run that reached `total_steps`.

  Args:
    workdir: the run's workdir (absolute).
    step: the step reached.
    total_steps: the run's total.
    evaluated: {label: (evaluator, metrics)}, the latest metrics of every
      evaluator (EMA ones labelled `ema/<name>`).
    times: `train._Clock.totals()`.
    model: the run's model (which commands apply to it).
    start_step: the step the run started at (resumed or already trained).

  Returns:
    The lines.
  """
  if start_step >= total_steps:
    head = (f"run summary: already trained for {total_steps} steps; "
            f"evaluated the checkpoint at step {step}")
  else:
    head = f"run summary: {step} of {total_steps} steps"
    if start_step:
      head += f" (resumed at step {start_step})"
  rows = [(label, _table(evaluator, metrics) or [short(metrics)])
          for label, (evaluator, metrics) in evaluated.items()]
  rows += _time_rows(times)
  checkpoint = newest_checkpoint(workdir)
  if checkpoint:
    rows.append(("checkpoint", [checkpoint]))
  rows.append(("next", next_commands(workdir, model)))
  curves = os.path.join(workdir, "curves.png")
  if os.path.isfile(curves):
    rows.append(("curves", [curves]))
  return _render(head, rows)


def stopped(workdir, signal_name, step, total_steps, times):
  """The block printed when a signal stopped the run at `step`."""
  head = (f"stopped by {signal_name} at step {step}; checkpoint saved, "
          f"{total_steps - step} of {total_steps} steps to go")
  rows = []
  checkpoint = newest_checkpoint(workdir)
  if checkpoint:
    rows.append(("checkpoint", [checkpoint]))
  rows.append(("resume", [f"run the same command again: it goes on from "
                          f"step {step}"]))
  return _render(head, rows + _time_rows(times))
