"""Evaluators: one file per kind, found by module name from `config.evals`.

    config.evals = {"eval": {"type": "classification", "every": 500},
                    "fewshot": {"type": "fewshot", "every": 0, "shots": ...}}

Each module defines `Evaluator(predict_fn, mesh, **fields)` with
`run(params, step=None) -> {metric: value}`; the training loop logs the
metrics as `<name>/<metric>` and prints them. `predict_fn(params, images,
**kwargs)` is the model in inference mode and returns `(output, out)` (see
`vit_jax.models`). `type` is a module of this package or any importable module
of your own; it defaults to the entry's name.

Fields an entry does not set take the run's values when the evaluator
accepts them by name: `dataset`, `split` (the run's `eval_split`),
`train_split`, `data_dir`, `batch_size` (`eval_batch_size`), `image_size`,
`num_channels`, `seed`, `workdir`, `log`, `strict_images`, `class_names`
(the training split's class names, in label order: evaluators map an image
folder's classes to the model's labels with them). An evaluator's `skipped`
attribute, when it has one, holds the damaged files its splits left out as
{split: paths}: the training loop warns of them and logs their count as
`<name>/skipped_images` (`common.report_skipped`).
"""

import inspect

from vit_jax import errors
from vit_jax import plugins

def _evaluator_class(name, kind):
  module = plugins.load("vit_jax.evaluators", kind)
  if module is None or not hasattr(module, "Evaluator"):
    raise errors.Error(
        f"evals.{name}: unknown evaluator type {kind!r}: use classification, "
        "regression, reconstruction, fewshot or an importable module that "
        "defines Evaluator")
  return module.Evaluator


def create(name, cfg, predict_fn, mesh, context):
  """The evaluator of entry `name` of `config.evals`.

  Args:
    name: the entry's name (the metrics' prefix).
    cfg: the entry (dict or ConfigDict) with `type`, `every` and fields.
    predict_fn: `(params, images, **kwargs) -> (output, out)`.
    mesh: the device mesh.
    context: the run's values for fields the entry does not set.

  Returns:
    (every, evaluator).
  """
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  kind = cfg.pop("type", None) or name
  every = int(cfg.pop("every", 0) or 0)
  cls = _evaluator_class(name, kind)
  params = inspect.signature(cls).parameters
  takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
  accepted = [k for k in params if k not in ("predict_fn", "mesh")]
  unknown = sorted(k for k in cfg if k not in params and not takes_any)
  if unknown:
    raise errors.Error(f"evals.{name}: unknown field(s) {unknown} for "
                       f"evaluator type {kind!r}; its fields are {accepted}")
  for key, value in context.items():
    if key in params and cfg.get(key) is None:
      cfg[key] = value
  try:
    return every, cls(predict_fn, mesh, **cfg)
  except (ValueError, KeyError, FileNotFoundError) as e:
    if isinstance(e, errors.Error):
      raise
    msg = e.args[0] if e.args else str(e)
    raise errors.Error(f"evals.{name} ({kind}): {msg}") from None
