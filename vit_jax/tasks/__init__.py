"""Tasks: how a training batch becomes (loss, metrics), one file per task.

`config.task` names a module of this package (`classification`,
`regression`, `simmim`) or any importable module of your own (`my_task`,
`my_pkg.my_task`). Each
defines `Task(config, source)` with

- `model_fields`: the model fields the task needs (`num_classes`,
  `decoder`, ...); they override the config's `model` fields;
- `output` (optional): what the model's output is under this task
  (`"logits"`, `"values"`, `"reconstruction"`); an evaluator whose module
  declares another `READS` cannot read it;
- `default_evals` (optional): the task's own evaluators, as `config.evals`
  entries, used in place of the config's entries that cannot read `output`
  (see `vit_jax.evaluators.for_task`);
- `loss(model, params, batch, rngs)`: the mean loss of a (micro)batch and a
  dict of scalar metrics, traced inside the jitted update step. `batch` holds
  the loader's arrays plus `index`, each example's position in the global
  batch; `rngs["dropout"]` is the model's dropout key (one per microbatch)
  and `rngs["step"]` the step's key, derived from (seed, step) only, for the
  task's own randomness (e.g. masks, with `fold_in(rngs["step"], index)`).

The training loop imports no task by name; a new task is one new file here
plus `--config.task=<name>`.
"""

from vit_jax import errors
from vit_jax import plugins


def create(config, source):
  """The Task of `config.task` for a training source."""
  name = config.get("task") or "classification"
  module = plugins.load("vit_jax.tasks", name)
  if module is None or not hasattr(module, "Task"):
    raise errors.Error(
        f"unknown task {name!r}: use classification, regression, simmim or "
        "an importable module that defines Task (--config.task)")
  return module.Task(config, source)
