"""Few-shot vs full accuracy: does the cheap metric rank models the same way?

  python -m vit_jax.sweep --config=experiments/fewshot_vs_finetune/sweep.py \
      --workdir=ROOT

The ViT paper uses the few-shot linear accuracy of frozen features as a
cheap stand-in for fine-tuning accuracy. Every point of the other four
studies reports both at the end of training: `fewshot/canvas/10shot` (a
closed-form ridge classifier on 10 training images per class, frozen
pre-logits) and `eval/accuracy` (the whole network trained or fine-tuned
with every label). This sweep lists all their settings with their points
under ROOT/<study>/, so with ROOT the parent of the other studies' ROOTs
(`--workdir=ROOT/posemb` etc.) it only collects; on an empty ROOT it runs
them all (about two hours on two CPU cores). The report gives the Spearman
and Kendall rank correlations between the two metrics over the settings
(means over seeds), overall and within each study, and ROOT/fewshot_vs_finetune.png.
"""

import os

from scipy import stats

from vit_jax import sweep as sweep_lib
from vit_jax import sweep_plots

STUDIES = ("posemb", "cls_vs_gap", "data_size", "hires_finetune")
FEWSHOT, FULL = "fewshot/canvas/10shot", "eval/accuracy"
HERE = os.path.dirname(os.path.abspath(__file__))


def _means(rows):
  """{(study, setting): (mean few-shot, mean full accuracy)}."""
  out = {}
  few = sweep_plots.by_setting(rows, FEWSHOT)
  full = sweep_plots.by_setting(rows, FULL)
  for setting in few:
    if setting in full:
      study, name = setting.split(": ", 1)
      out[(study, name)] = (sweep_lib.mean_std(few[setting])[0],
                            sweep_lib.mean_std(full[setting])[0])
  return out


def _unique(means):
  """The pairs with runs shared between studies counted once: the position
  study's learned 1-D, the pooling study's class token at lr 2e-3, ... are
  the same config and seeds, hence the same numbers."""
  return list(dict.fromkeys(means.values()))


def _correlation(pairs):
  few, full = zip(*pairs)
  return stats.spearmanr(few, full)[0], stats.kendalltau(few, full)[0]


def report(rows, root):
  means = _means(rows)
  lines = ["| settings | n | Spearman ρ | Kendall τ |", "|---|---|---|---|"]
  groups = [("all (distinct runs)", _unique(means))] + [
      (study, [v for (s, _), v in means.items() if s == study])
      for study in STUDIES]
  for label, pairs in groups:
    if len(pairs) >= 3:
      rho, tau = _correlation(pairs)
      lines.append(f"| {label} | {len(pairs)} | {rho:.2f} | {tau:.2f} |")
  _scatter(means, os.path.join(root, "fewshot_vs_finetune.png"))
  return "\n".join(lines) + "\n\n![](fewshot_vs_finetune.png)"


def _scatter(means, path):
  plt = sweep_plots.plt
  fig, ax = plt.subplots(figsize=(5.2, 4.2))
  for study in STUDIES:
    pts = [v for (s, _), v in means.items() if s == study]
    if pts:
      ax.scatter([100 * f for f, _ in pts], [100 * a for _, a in pts],
                 label=study, s=22)
  lo, hi = ax.get_xlim()
  ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
  ax.set_xlabel("10-shot linear accuracy (%)")
  ax.set_ylabel("test accuracy, all labels (%)")
  ax.set_title("digits_canvas: cheap metric vs full accuracy", fontsize=10)
  ax.legend(fontsize=8)
  sweep_plots.save(fig, path)


def get_sweep():
  settings = []
  for study in STUDIES:
    path = os.path.join(HERE, "..", study, "sweep.py")
    for s in sweep_lib.load_sweep(path)["settings"]:
      overrides = {k: (v.replace("{root}", "{root}/" + study)
                       if isinstance(v, str) else v)
                   for k, v in (s.get("overrides") or {}).items()}
      settings.append(dict(s, name=f"{study}: {s['name']}",
                           point=f"{study}/{sweep_lib.slug(s['name'])}",
                           overrides=overrides))
  return dict(settings=settings, seeds=(0, 1, 2), metrics=[FULL, FEWSHOT],
              report=report)
