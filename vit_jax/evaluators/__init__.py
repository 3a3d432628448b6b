"""Evaluators: one file per kind, found by module name from `config.evals`.

    config.evals = {"eval": {"type": "classification", "every": 500},
                    "fewshot": {"type": "fewshot", "every": 0, "shots": ...}}

Each module defines `Evaluator(predict_fn, mesh, **fields)` with `run(params,
step=None) -> {metric: value}`; the training loop logs the metrics as
`<name>/<metric>` and prints them on one line, or as the lines of the
evaluator's `format_lines(metrics)` (a caption, then a table) when it defines
one, as the few-shot evaluator does (see `vit_jax.run_summary`).
`predict_fn(params, images, **kwargs)` is the model in inference mode and
returns `(output, out)` (see `vit_jax.models`). `type` is a module of this
package or any importable module of your own; it defaults to the entry's name.

Fields an entry does not set take the run's values when the evaluator
accepts them by name: `dataset`, `split` (the run's `eval_split`),
`train_split`, `data_dir`, `batch_size` (`eval_batch_size`), `image_size`,
`num_channels`, `seed`, `workdir`, `log`, `strict_images`, `class_names`
(the training split's class names, in label order: evaluators map an image
folder's classes to the model's labels with them). An evaluator's `skipped`
attribute, when it has one, holds the damaged files its splits left out as
{split: paths}: the training loop warns of them and logs their count as
`<name>/skipped_images` (`common.report_skipped`).

A module may declare `READS`, the task output its evaluator reads
(`"logits"`, `"values"`, `"reconstruction"`; None or absent: any, e.g. the
few-shot evaluator, which reads a representation). `for_task` fits the
config's entries to the task (see there).
"""

import inspect

from vit_jax import config_utils
from vit_jax import errors
from vit_jax import plugins


def _module(name, kind):
  module = plugins.load("vit_jax.evaluators", kind)
  if module is None or not hasattr(module, "Evaluator"):
    raise errors.Error(
        f"evals.{name}: unknown evaluator type {kind!r}: use classification, "
        "regression, reconstruction, fewshot or an importable module that "
        "defines Evaluator")
  return module


def _evaluator_class(name, kind):
  return _module(name, kind).Evaluator


def for_task(config, task, log=None):
  """The entries of `config.evals` that can read the task's output.

  A task that declares its `output` (see `vit_jax.tasks`) is evaluated only
  by evaluators that read it. An entry that cannot, set by the config file
  (e.g. the default `eval` of type classification under
  `--config.task=regression`), is replaced by the task's `default_evals`
  (an entry of the same name keeps its `every`), with one note to `log`; one
  whose type was set on the command line is an Error naming it and the task.
  Disabled entries (`every` < 0) are kept as they are.

  Args:
    config: the experiment ConfigDict.
    task: the run's Task.
    log: print-like function for the note (None: silent).

  Returns:
    {name: entry dict}, in the config's order, the task's defaults in place
    of the entries they replace.
  """
  entries = {}
  for name, cfg in (config.get("evals") or {}).items():
    if cfg is not None:
      entries[name] = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  output = getattr(task, "output", None)
  if output is None:
    return entries
  task_name = config.get("task") or "classification"
  defaults = dict(getattr(task, "default_evals", None) or {})
  explicit = config_utils.command_line_overrides(config)
  unfit = {}
  for name, cfg in entries.items():
    if int(cfg.get("every", 0) or 0) < 0:
      continue
    kind = cfg.get("type") or name
    reads = getattr(_module(name, kind), "READS", None)
    if reads is None or reads == output:
      continue
    if f"evals.{name}.type" in explicit or f"evals.{name}" in explicit:
      fits = sorted({d.get("type") or n for n, d in defaults.items()})
      fix = (f"use --config.evals.{name}.type={'|'.join(fits)}" if fits else
             "drop the flag")
      raise errors.Error(
          f"evals.{name}: the {kind} evaluator reads {reads}, but the model "
          f"of the {task_name} task outputs {output}: {fix} (or pick "
          "another --config.task)")
    unfit[name] = kind
  if not unfit:
    return entries
  fitted = {}
  for name, cfg in entries.items():
    if name not in unfit:
      fitted[name] = cfg
    elif name in defaults:
      fitted[name] = dict(defaults[name])
      if "every" in cfg:
        fitted[name]["every"] = cfg["every"]
  added = []
  for name, cfg in defaults.items():
    if name not in entries:
      fitted[name] = dict(cfg)
    if name in unfit or name not in entries:
      added.append(f"evals.{name} ({cfg.get('type') or name})")
  if log is not None:
    dropped = ", ".join(f"evals.{n} ({k})" for n, k in unfit.items())
    log(f"note: the model of the {task_name} task outputs {output}, which "
        f"{dropped} cannot read: evaluating with "
        f"{', '.join(added) or 'the remaining evaluators'} instead")
  return fitted


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
