"""Plots of sweep results, for a sweep file's `report(rows, root)`.

Rows are those of ROOT/results.jsonl (`{"point", "setting", "seed",
"seconds", "metrics"}`); every plot shows the mean over seeds with the
standard deviation (ddof=1) as error bars and writes one PNG.
"""

import math

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from vit_jax.sweep import mean_std  # pylint: disable=g-bad-import-order,wrong-import-position


def by_setting(rows, metric):
  """{setting: [metric value per seed]} in the order the rows come."""
  out = {}
  for row in rows:
    if metric in row["metrics"]:
      out.setdefault(row["setting"], []).append(float(row["metrics"][metric]))
  return out


def _percent(metric):
  return "accuracy" in metric or "shot" in metric


def _scale(metric):
  return 100.0 if _percent(metric) else 1.0


def bars(rows, metrics, path, title, labels=None):
  """Grouped bars: one group per setting, one bar per metric."""
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(settings), 3.6))
  width = 0.8 / len(metrics)
  for k, metric in enumerate(metrics):
    values = by_setting(rows, metric)
    stats = [mean_std(values[s]) if s in values else (math.nan, 0.0)
             for s in settings]
    xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(settings))]
    ax.bar(xs, [m * _scale(metric) for m, _ in stats], width,
           yerr=[sd * _scale(metric) for _, sd in stats], capsize=3,
           label=(labels or metrics)[k])
  ax.set_xticks(range(len(settings)))
  ax.set_xticklabels(settings, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("%" if all(map(_percent, metrics)) else "value")
  ax.set_title(title, fontsize=10)
  if len(metrics) > 1:
    ax.legend(fontsize=8)
  save(fig, path)


def lines(rows, x_of, group_of, metric, path, title, xlabel, logx=False):
  """One line per group: the metric (mean ± std) against x_of(setting)."""
  values = by_setting(rows, metric)
  groups = {}
  for setting, vals in values.items():
    groups.setdefault(group_of(setting), []).append(
        (x_of(setting),) + mean_std(vals))
  fig, ax = plt.subplots(figsize=(4.8, 3.6))
  for group, points in groups.items():
    points.sort()
    ax.errorbar([p[0] for p in points], [p[1] * _scale(metric) for p in points],
                yerr=[p[2] * _scale(metric) for p in points], marker="o",
                capsize=3, label=group)
  if logx:
    ax.set_xscale("log")
    xs = sorted({p[0] for points in groups.values() for p in points})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
  ax.set_xlabel(xlabel)
  ax.set_ylabel(metric + (" (%)" if _percent(metric) else ""))
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  save(fig, path)


def save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
