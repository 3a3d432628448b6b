"""Training curves: loss, learning rate and evaluator metrics over steps.

Reads the rows of DIR/metrics.jsonl (`vit_jax.metrics`) of one workdir or of
several (a sweep's points) and draws one PNG:

- `train/loss` (log y when it spans a decade) and `train/lr`, a panel each;
- every evaluator metric, a panel each (`eval/accuracy`, `eval/loss`, ...);
  few-shot accuracies `<evaluator>/<dataset>/<N>shot` share one panel per
  dataset with a line per shot count for one workdir, a panel per shot count
  for several. Counts (`num_*`, `*skipped_images`), the few-shot `_std` and
  `_l2` companions, `train/grad_norm`, `perf/*` and `data/*` are left out,
  as are values that are not finite;
- the Polyak-averaged twin `ema/<metric>` dashed (hollow markers), in its
  metric's colour.

One workdir: a legend per panel with the last value of each line. Several:
one colour per run, thin lines and one legend (in an empty slot of the
grid where it fits, else beside the panels); runs named
`<setting>_s<seed>` (a sweep's points) share their setting's colour, so that
30 points of 10 settings read as 10 colours with the seeds' spread.

Training writes DIR/curves.png at every evaluation (`write_safely`: a
failure is one warning line); `python -m vit_jax.analyze --what=curves`
writes it for a workdir, a list of workdirs or a sweep ROOT. Figures are
drawn on a `matplotlib.figure.Figure` with the Agg canvas (no pyplot state)
and replaced atomically.
"""

import math
import os
import re

from vit_jax import errors
from vit_jax import metrics as metrics_lib
from vit_jax.analysis import _plot

FILENAME = "curves.png"

_SKIPPED_PREFIXES = ("perf/", "data/")
_SKIPPED_KEYS = ("train/grad_norm",)
_SHOT = re.compile(r"(.+)/(\d+)shot")
_SHOT_EXTRA = re.compile(r".+/\d+shot_.+")  # _std, _l2, _fixed_l2, ...
_POINT = re.compile(r"(.+)_s(\d+)")


def has_metrics(workdir):
  return os.path.isfile(os.path.join(workdir, "metrics.jsonl"))


def runs_of(path):
  """[(name, workdir)]: `path` itself when it holds metrics.jsonl, else its
  subdirectories that do (a sweep ROOT), in natural name order."""
  if has_metrics(path):
    return [(os.path.basename(os.path.normpath(path)), path)]
  if not os.path.isdir(path):
    return []
  names = sorted((n for n in os.listdir(path)
                  if has_metrics(os.path.join(path, n))),
                 key=metrics_lib.natural_key)
  return [(n, os.path.join(path, n)) for n in names]


def read_series(workdir):
  """{metric: ([steps], [values])} of DIR/metrics.jsonl, finite values only,
  in step order (a step logged twice keeps its last value)."""
  try:
    rows = metrics_lib.read_jsonl(workdir)
  except ValueError as e:
    raise errors.Error(
        f"{os.path.join(workdir, 'metrics.jsonl')} has a line that is not "
        f"JSON ({errors.first_line(e)}): a run killed while writing it; "
        "resuming the run repairs it") from None
  points = {}
  for row in rows:
    step = row.get("step")
    if not isinstance(step, (int, float)):
      continue
    for key, value in row.items():
      if key == "step" or not _kept(key):
        continue
      try:
        value = float(value)
      except (TypeError, ValueError):
        continue
      if math.isfinite(value):
        points.setdefault(key, {})[int(step)] = value
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in points.items()}


def _kept(key):
  if key.startswith(_SKIPPED_PREFIXES) or key in _SKIPPED_KEYS:
    return False
  base = key.removeprefix("ema/")
  leaf = base.rsplit("/", 1)[-1]
  if "/" not in base or leaf.startswith("num_") or leaf.endswith(
      "skipped_images"):
    return False
  if base.startswith("train/") and base not in ("train/loss", "train/lr"):
    return False
  return not _SHOT_EXTRA.fullmatch(base)


def _place(key, overlay):
  """(panel, line name, is EMA, in %) of a kept metric."""
  ema = key.startswith("ema/")
  base = key.removeprefix("ema/")
  shot = _SHOT.fullmatch(base)
  if shot and not overlay:
    return shot.group(1), f"{shot.group(2)}-shot", ema, True
  return base, "", ema, bool(shot) or "accuracy" in base.rsplit("/", 1)[-1]


def _fmt(value, percent):
  return f"{100 * value:.1f}%" if percent else f"{value:.4g}"


def groups_of(names):
  """A colour group per run: its setting when the names are a sweep's
  points `<setting>_s<seed>` with some setting run with several seeds,
  else the name itself."""
  matches = [_POINT.fullmatch(n) for n in names]
  if all(matches):
    settings = [m.group(1) for m in matches]
    if len(set(settings)) < len(settings):
      return settings
  return list(names)


def _colours(count):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  if count <= 10:
    return [colormaps["tab10"](i) for i in range(count)]
  if count <= 20:
    return [colormaps["tab20"](i) for i in range(count)]
  return [colormaps["turbo"](0.05 + 0.9 * i / (count - 1))
          for i in range(count)]


# Layout, in inches: panels of a fixed size at fixed gaps (cheaper than a
# layout engine, which draws the figure twice).
_PANEL = (3.1, 1.9)
_GAP = (0.75, 0.65)
_MARGIN = dict(left=0.7, right=0.25, top=0.6, bottom=0.55)


def _panels(runs, overlay):
  """({panel: {line: [(run index, is EMA, steps, values)]}}, panels in %)."""
  panels, percent_panels = {}, set()
  for key in ("train/loss", "train/lr"):
    if any(key in r[1] for r in runs):
      panels[key] = {}
  for i, run in enumerate(runs):
    for key, (steps, values) in run[1].items():
      panel, line, ema, percent = _place(key, overlay)
      panels.setdefault(panel, {}).setdefault(line, []).append(
          (i, ema, steps, values))
      if percent:
        percent_panels.add(panel)
  return {k: v for k, v in panels.items() if v}, percent_panels


def _slots(panels):
  """(columns, [panel or None] row by row): a row (or rows) per group of
  panels, the training ones first, then each evaluator's."""
  rows = {}
  for panel in panels:
    rows.setdefault(panel.split("/")[0], []).append(panel)
  ncols = max([1] + [min(3, len(r)) for r in rows.values()])
  slots = []
  for members in rows.values():
    for k in range(0, len(members), ncols):
      chunk = members[k:k + ncols]
      slots.extend(chunk + [None] * (ncols - len(chunk)))
  return ncols, slots or [None]


def plot(runs, path, title=None):
  """Draws the curves of `runs` into the PNG `path` (replaced atomically).

  Args:
    runs: [(name, series)] or [(name, series, group)], `series` as
      `read_series` returns; runs of one group share a colour (default:
      `groups_of` the names).
    path: the PNG to write.
    title: the figure's title (default: the run's name, or the run count).

  Returns:
    The titles of the panels drawn ([]: nothing to draw; a figure saying so
    is written).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  names = [r[0] for r in runs]
  groups = [r[2] if len(r) > 2 and r[2] is not None else g
            for r, g in zip(runs, groups_of(names))]
  overlay = len(runs) > 1
  order = list(dict.fromkeys(groups))
  colour_of = dict(zip(order, _colours(len(order))))
  panels, percent_panels = _panels(runs, overlay)
  last_step = max((s for r in runs for steps, _ in r[1].values() for s in steps),
                  default=0)
  if title is None:
    title = (f"{names[0]}: training curves" if not overlay
             else f"training curves of {len(runs)} runs")

  handles = []
  if overlay:  # One legend for the figure: a colour per group.
    for group in order:
      members = sum(g == group for g in groups)
      handles.append(Line2D(
          [], [], color=colour_of[group], linewidth=1.6,
          label=group if [group] == [n for n, g in zip(names, groups)
                                     if g == group] else f"{group} ({members})"))
    if any(ema for lines in panels.values() for entries in lines.values()
           for _, ema, _, _ in entries):
      handles.append(Line2D([], [], color="0.3", linestyle="--", marker="o",
                            markerfacecolor="none", markersize=3.5,
                            label="EMA parameters"))
  ncols, slots = _slots(panels)
  nrows = len(slots) // ncols
  # The legend goes into the first empty slot of the grid where it fits
  # there, else into a column of its own on the right.
  longest = max([len(h.get_label()) for h in handles] + [0])
  column = 0.5 + 0.055 * longest  # Inches: the line and the label.
  in_slot = max(1, min(3, int(_PANEL[0] // column)))
  legend_slot = None
  per_column = int(_PANEL[1] / 0.14)
  if handles and None in slots and len(handles) <= in_slot * per_column:
    legend_slot = slots.index(None)
    legend_cols, legend_width = -(-len(handles) // per_column), 0
  else:
    legend_cols = 1 if len(handles) <= 24 else 2
    legend_width = legend_cols * column + 0.2 if handles else 0
  m = _MARGIN
  width = (m["left"] + ncols * _PANEL[0] + (ncols - 1) * _GAP[0] + m["right"]
           + legend_width)
  height = m["top"] + nrows * _PANEL[1] + (nrows - 1) * _GAP[1] + m["bottom"]
  fig = Figure(figsize=(width, height))
  fig.subplots_adjust(
      left=m["left"] / width, bottom=m["bottom"] / height,
      right=1 - (m["right"] + legend_width) / width, top=1 - m["top"] / height,
      wspace=_GAP[0] / _PANEL[0], hspace=_GAP[1] / _PANEL[1])
  grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
  thin = len(runs) > 6
  for ax, panel in zip(grid, slots):
    if panel is None:
      ax.set_visible(False)
      continue
    percent = panel in percent_panels
    scale = 100.0 if percent else 1.0
    shown = []
    lines = sorted(panels[panel].items(),
                   key=lambda kv: metrics_lib.natural_key(kv[0]))
    for k, (line, entries) in enumerate(lines):
      for i, ema, steps, values in entries:
        label = None
        if not overlay and panel != "train/lr":
          label = ", ".join(p for p in (
              " ".join(p for p in (line, "EMA" if ema else "") if p),
              f"last {_fmt(values[-1], percent)}") if p)
        ax.plot(steps, [v * scale for v in values],
                color=colour_of[groups[i]] if overlay else f"C{k}",
                linestyle="--" if ema else "-",
                linewidth=0.9 if thin else 1.4, alpha=0.75 if thin else 0.95,
                marker="o" if len(steps) <= (5 if thin else 20) else None,
                markerfacecolor="none" if ema else None,
                markersize=2.5 if thin else 3.5, label=label)
        shown.extend(values)
    positive = [v for v in shown if v > 0]
    if (panel != "train/lr" and not percent and positive
        and len(positive) == len(shown)
        and max(positive) >= 10 * min(positive)):
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(_plain)
      ax.yaxis.set_minor_formatter(_plain)
    if percent and shown:
      _min_span(ax, 100 * min(shown), 100 * max(shown), 2.0)
    if panel == "train/lr":
      ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set_title(panel + (" (%)" if percent else ""), fontsize=9)
    ax.set_xlim(0, max(last_step, 1) * 1.03)
    ax.tick_params(which="both", labelsize=7)
    ax.yaxis.offsetText.set_fontsize(7)
    ax.grid(alpha=0.3, linewidth=0.5)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc="best", framealpha=0.7)
  if panels:
    fig.text(0.5 * (1 - legend_width / width), 0.12 / height, "step",
             ha="center", fontsize=8)
  else:
    grid[0].set_visible(True)
    grid[0].text(0.5, 0.5, "no training or evaluation metrics yet",
                 ha="center", va="center", fontsize=9)
    grid[0].set_axis_off()
  if handles:
    where = dict(loc="upper left", bbox_to_anchor=(
        1 - legend_width / width, 1 - m["top"] / height))
    if legend_slot is not None:
      where = dict(loc="upper left", bbox_to_anchor=(0, 1),
                   bbox_transform=grid[legend_slot].transAxes)
    fig.legend(handles=handles, fontsize=7, ncols=legend_cols,
               frameon=False, title_fontsize=7,
               title="setting (runs)" if groups != names else "run", **where)
  fig.suptitle(title, fontsize=10, y=1 - 0.15 / height, va="top")
  _save(fig, path)
  return list(panels)


def _plain(value, _):
  """A log axis' tick label as a plain number: 0.2, not 2 x 10^-1."""
  return f"{value:g}"


def _min_span(ax, low, high, span):
  """Widens the y range to at least `span` (within [0, 100]) so that small
  differences of a percentage do not look large."""
  if high - low >= span:
    return
  bottom, top = _plot.span_at_least(low, high, span, (0.0, 100.0))
  pad = 0.05 * span
  ax.set_ylim(bottom - pad, top + pad)


def _save(fig, path):
  """Writes the figure to `path` through a temporary file and os.replace,
  so that a killed process never leaves a cut PNG behind."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write(runs, path, title=None):
  """Reads the runs' metrics and plots them: [(name, workdir[, group])] ->
  `path`; returns the panels' titles."""
  return plot([(r[0], read_series(r[1])) + tuple(r[2:]) for r in runs], path,
              title)


def write_safely(workdir, log=print, runs=None, title=None):
  """`write` of DIR/curves.png (by default the workdir's own run) that never
  raises: a failure is one warning line through `log`. For the training loop
  and a sweep's collection, which go on without the picture."""
  path = os.path.join(workdir, FILENAME)
  try:
    write(runs or [(os.path.basename(os.path.normpath(workdir)), workdir)],
          path, title)
  except Exception as e:  # pylint: disable=broad-except
    log(f"warning: could not draw {path}: {errors.first_line(e, 200)}")
    return False
  return True
