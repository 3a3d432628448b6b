"""Metric writer: DIR/metrics.jsonl, TensorBoard events and training progress.

Only process 0 writes. Every `write(step, metrics)` appends one JSON object
`{"step": step, "train/loss": ..., ...}` to metrics.jsonl and the same scalars
to the TensorBoard event file in DIR/tb.

Progress goes to a tqdm bar on stderr when that is a terminal and `progress`
is set, else a row with the training loss prints a plain line (a log file
gets no carriage returns):

    step 100/600  loss 1.4767  lr 2.0e-03  1234 img/s  ETA 0:00:42

A writer that starts at `initial_step` (a resumed run) first drops the rows
an interrupted run wrote past that step (after its last checkpoint; a run
from step 0 drops them all), and TensorBoard purges its events past it, so
that the files hold the rows of one uninterrupted run.
"""

import datetime
import json
import math
import os
import re
import sys
import time

import jax


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without PyTorch.

  tensorboardX imports PyTorch when it is installed (for tensors we never
  pass it), which costs seconds at the start and the exit of every run; it
  falls back to numpy when the import fails, so the import is refused while
  tensorboardX loads, unless PyTorch is already loaded.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def natural_key(name):
  """Sort key of a metric or run name with its numbers compared as numbers
  ("5shot" < "10shot", "s2" < "s10", "wd0.05" < "wd0.1")."""
  parts = re.split(r"(\d+(?:\.\d+)?)", name)
  return [float(t) if k % 2 else t for k, t in enumerate(parts)]


def _is_terminal(stream):
  try:
    return stream.isatty()
  except (AttributeError, ValueError):  # No isatty, or closed.
    return False


def _clock(seconds):
  """H:MM:SS."""
  return str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard; shows progress."""

  def __init__(self, workdir, total_steps, initial_step=0, progress=True):
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    self._total = int(total_steps)
    # (time, step) of the last plain line, for the ETA.
    self._last = (time.perf_counter(), int(initial_step))
    if not self.active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, initial_step if initial_step else -1)
    self._jsonl = open(path, "a")
    self._tb = _summary_writer_class()(os.path.join(workdir, "tb"),
                                       purge_step=int(initial_step) + 1)
    if progress and _is_terminal(sys.stderr):
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                       dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0, smoothing=0.1)

  def write(self, step, metrics):
    """Records scalar metrics at `step`."""
    if not self.active or not metrics:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      row[k] = v if math.isfinite(v) else str(v)
      self._tb.add_scalar(k, v, int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    self._tb.flush()
    if "train/loss" not in metrics:
      return
    if self._bar is not None:
      self._bar.set_postfix(loss=f"{float(metrics['train/loss']):.4f}",
                            refresh=False)
    else:
      print(self._progress_line(int(step), metrics), flush=True)

  def _progress_line(self, step, metrics):
    """`step S/T  loss L  lr R  N img/s  ETA H:MM:SS`; the ETA from the
    steps since the previous line."""
    parts = [f"step {step:>{len(str(self._total))}}/{self._total}",
             f"loss {float(metrics['train/loss']):.4f}"]
    if "train/lr" in metrics:
      parts.append(f"lr {float(metrics['train/lr']):.1e}")
    if "perf/img_per_sec" in metrics:
      parts.append(f"{float(metrics['perf/img_per_sec']):.0f} img/s")
    now = time.perf_counter()
    last_time, last_step = self._last
    if step > last_step:
      rate = (now - last_time) / (step - last_step)
      parts.append(f"ETA {_clock(rate * (self._total - step))}")
    self._last = (now, step)
    return "  ".join(parts)

  def advance(self, n=1):
    if self._bar is not None:
      self._bar.update(n)

  def print(self, message):
    """Prints a line on process 0 without breaking the progress bar."""
    if not self.active:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if not self.active:
      return
    if self._bar is not None:
      self._bar.close()
    self._jsonl.close()
    self._tb.close()


def _drop_rows_after(path, step):
  """Rewrites metrics.jsonl without its rows past `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue  # A line cut short by a kill.
    if row_step <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept == lines:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def read_jsonl(workdir):
  """All rows of DIR/metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
