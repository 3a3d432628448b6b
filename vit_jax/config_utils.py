"""Experiment configuration: defaults, validation and the resolved config file.

Every config in `configs/` starts from `default_config()` and changes what it
needs. Fields that may be unset use `ml_collections` placeholders so that they
can still be overridden from the command line (`--config.init=/path.npz`).

Regular expressions in the config (`optim.frozen`, `optim.lr_mults`,
`optim.wd_pattern`, `partition_rules`, `dont_load`) all follow one convention:
they are searched (`re.search`) in the `/`-joined parameter path, e.g.
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`; anchor them with `^`
and `$` where needed.
"""

import dataclasses
import json
import math
import os
from typing import Optional

import ml_collections
from ml_collections import config_dict


from vit_jax.errors import Error


# The L2 penalties the few-shot evaluator searches by leave-one-out, 2^-10 ..
# 2^20 (`evaluators/ridge.L2_GRID`); here so that configs name it without JAX.
FEWSHOT_L2_GRID = tuple(2.0**k for k in range(-10, 21))


def parse_arg(arg, names):
  """Parses `get_config` arguments `"a,b,runlocal"` into a dict.

  Args:
    arg: the string after `:` in `--config=file.py:arg` (may be None).
    names: positional names, e.g. ("variant", "dataset").

  Returns:
    dict with each name (None when missing) and `runlocal` (bool).
  """
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  runlocal = "runlocal" in parts
  parts = [p for p in parts if p != "runlocal"]
  if len(parts) > len(names):
    raise Error(f"too many config arguments {arg!r}: expected "
                f"{','.join(names)}[,runlocal]")
  out = dict(zip(names, parts + [None] * (len(names) - len(parts))))
  out["runlocal"] = runlocal
  return out


def architecture(variant):
  """A variant's model fields without the data-dependent ones.

  Configs copy them into `config.model` so that each can be overridden on the
  command line (`--config.model.hidden_size=...`).
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  arch = models.get_config(variant)
  valid = models.fields(variant)
  return {k: v for k, v in arch.items()
          if k in valid and k not in ("num_classes", "image_size")}


def check_variant_and_dataset(variant, dataset, datasets, config_file):
  """One-line errors for an unknown variant or dataset preset."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  usage = f"({config_file}:<variant>,<dataset>)"
  if variant not in models.VARIANTS:
    raise Error(f"unknown variant {variant!r}: use one of "
                f"{', '.join(models.VARIANTS)} {usage}")
  if dataset not in datasets:
    raise Error(f"unknown dataset {dataset!r}: use one of "
                f"{', '.join(datasets)} {usage}, or pick any with "
                "--config.dataset")


def shrink_to_runlocal(c, variant, eval_split):
  """A CPU-sized smoke run of a dataset config: tiny images and batches,
  5 steps, one encoder block (a BiT ResNet: one unit per stage at a quarter
  of the width), 64 training and 16 evaluation examples."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create(variant, num_classes=1)
  stride = model.encoder_stride[0]
  c.image_size = (2 * stride, 2 * stride)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_epochs = None
  c.total_steps = 5
  c.optim.warmup_steps = 1
  c.log_steps = 1
  c.checkpoint_steps = 5
  for entry in c.evals.values():
    entry.every = 5
  c.train_split = "train[:64]"
  c.eval_split = f"{eval_split}[:16]"
  if models.is_bit(variant):
    c.model.resnet = dict(num_layers=(1,) * len(model.resnet["num_layers"]),
                          width_factor=0.25)
  else:
    c.model.num_layers = 1
  return c


# Tensor parallelism over the "model" mesh axis: attention heads and MLP
# hidden units. Specs are for one (unstacked) block; a scanned encoder's
# leading depth axis is added automatically.
DEFAULT_PARTITION_RULES = (
    (r"MultiHeadDotProductAttention_\d+/(query|key|value)/kernel$",
     (None, "model", None)),
    (r"MultiHeadDotProductAttention_\d+/(query|key|value)/bias$",
     ("model", None)),
    (r"MultiHeadDotProductAttention_\d+/out/kernel$", ("model", None, None)),
    (r"MlpBlock_\d+/Dense_0/kernel$", (None, "model")),
    (r"MlpBlock_\d+/Dense_0/bias$", ("model",)),
    (r"MlpBlock_\d+/Dense_1/kernel$", ("model", None)),
)


# Fields that are data, not architecture: top-level config fields.
DATA_FIELDS = ("image_size", "num_channels")

_PLACEHOLDER_TYPES = {int: int, float: float, bool: bool, str: str,
                      Optional[int]: int, Optional[float]: float}


def model_config():
  """`config.model`: every VisionTransformer field but DATA_FIELDS, unset.

  Unset (None) fields take the variant's value. Fields that may be an int or
  a pair (`patch_size`) or a dict (`resnet`) accept any value, e.g.
  `--config.model.patch_size=(4,8)`.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  for field in dataclasses.fields(models.VisionTransformer):
    if field.name in models.FIELDS and field.name not in DATA_FIELDS:
      kind = _PLACEHOLDER_TYPES.get(field.type, object)
      setattr(c, field.name, config_dict.placeholder(kind))
  return c


def model_kwargs(config, log=None):
  """The set `config.model` fields, as a dict for `models.create`.

  `config.model` holds the VisionTransformer fields. A model of another
  family (a BiT ResNet) takes its own fields only: the config file's values
  of the others are dropped (with a note to `log`), and one set by a
  `--config.model.*` flag is an Error naming it.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  fields = config.model.to_dict() if config.get("model") else {}
  kwargs = {k: v for k, v in fields.items() if v is not None}
  name = config.get("model_name")
  if name not in models.VARIANTS:
    return kwargs
  valid = models.fields(name)
  foreign = sorted(k for k in kwargs if k not in valid)
  if not foreign:
    return kwargs
  overrides = command_line_overrides(config)
  flagged = [k for k in foreign if f"model.{k}" in overrides]
  if flagged:
    own = [k for k in valid if k not in DATA_FIELDS]
    raise Error(f"--config.model.{flagged[0]} does not apply to {name}, a BiT "
                f"ResNet: its model fields are {', '.join(own)} (drop the flag "
                "or pick a ViT --config.model_name)")
  if log is not None:
    log(f"note: {name} is a BiT ResNet: ignoring the ViT fields of the config "
        f"({', '.join(f'{k}={kwargs[k]!r}' for k in foreign)})")
  return {k: v for k, v in kwargs.items() if k in valid}


def command_line_overrides(config):
  """Dotted names set by `--config.*` flags, when `config` is the parsed
  `--config` of this process's command line (else empty)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  if "config" not in flags.FLAGS:
    return {}
  flag = flags.FLAGS["config"]
  if flag.value is not config:
    return {}
  try:
    return dict(config_flags.get_override_values(flag))
  except (AttributeError, TypeError):  # Not a config_flags flag.
    return {}


def forget_config_overrides(flag_values):
  """Drops the `--config.*` flags an earlier parse of `flag_values` defined.

  ml_collections defines one flag per field of the config it loaded, bound to
  that config object; parsed again in the same process (tests, a sweep), they
  would set the fields of the old config, not of the one loaded now.
  """
  for name in list(flag_values):
    if name.startswith("config."):
      delattr(flag_values, name)


def default_config():
  """All fields a config may set, with their defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data: see `vit_jax.data.get_source` for dataset names.
  c.dataset = "digits"
  c.data_dir = config_dict.placeholder(str)
  c.train_split = "train"
  c.eval_split = "test"
  c.image_size = (224, 224)
  c.num_channels = config_dict.placeholder(int)  # None: the source's.
  # Damaged image files in a folder are skipped (counted in the metric
  # data/skipped_images); strict_images=True makes them an error instead.
  c.pp = ml_collections.ConfigDict(dict(
      inception_crop=True, crop_area=(0.05, 1.0), flip=True, worker_count=0,
      strict_images=False))
  c.batch_size = 512
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size.
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)

  # Model: `models.create(model_name, **model)`. Every VisionTransformer
  # field is here (image size and channels are the data's: `image_size`,
  # `num_channels` above); None means the variant's value (or the class
  # default). Configs copy the variant's architecture in so that each field
  # shows in config.json and can be overridden (`--config.model.qkv_bias=False`).
  c.model_name = "B/16"
  c.model = model_config()

  # Task (vit_jax/tasks/): how a batch becomes a loss.
  c.task = "classification"  # Or "regression", "simmim".
  c.loss = "softmax_xent"  # classification: or "sigmoid_xent".
  c.label_smoothing = 0.0

  # Optimizer (see vit_jax/optim.py).
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw",     # "sgd", "adam", "adamw" or any optax optimizer name.
      kwargs=ml_collections.ConfigDict(),  # Extra constructor arguments.
      lr=1e-3,
      schedule="cosine",  # "cosine", "linear", "rsqrt" or "constant".
      warmup_steps=0,
      end_lr=0.0,        # Learning rate reached at the last step.
      weight_decay=0.0,  # Decoupled; multiplied by the learning rate.
      wd_pattern=r"/kernel$",  # Parameters that are decayed.
      clip_norm=0.0,     # Global-norm clipping; 0 disables it.
      frozen="",         # Regex of parameters that are not trained.
      lr_mults=(),       # ((regex, multiplier), ...), first match wins.
      accum_steps=1,     # Gradient accumulation: microbatches per step.
      ema_decay=0.0,     # Polyak averaging of parameters; 0 disables it.
      layer_decay=0.0,   # Layer-wise lr decay (SimMIM fine-tuning: 0.65-0.75);
                         # 0 disables it.
  ))

  # Devices.
  c.mesh = (("data", -1), ("model", 1))
  c.fsdp = False          # Shard parameters/optimizer state over "data".
  c.fsdp_min_size = 2**16  # Leaves with fewer elements stay replicated.
  c.partition_rules = DEFAULT_PARTITION_RULES
  c.distributed = False   # jax.distributed.initialize() before anything.

  # Schedule of side jobs (0 disables; a checkpoint is always written at
  # the end).
  c.log_steps = 50
  c.checkpoint_steps = 500
  c.max_to_keep = 3
  # With no usable checkpoint left in the workdir where damaged ones were
  # set aside: train from step 0 (True) or stop with an error (False).
  c.fresh_start = False
  c.progress = True  # tqdm bar on a terminal; False or a log file: plain lines.

  # Evaluators (vit_jax/evaluators/): name -> {type, every, fields}. Metrics
  # are logged as "<name>/<metric>". `every`: period in steps; 0: only at the
  # end; negative: never. Fields not given take the run's values (dataset,
  # eval_split, eval_batch_size, image_size, num_channels, data_dir).
  c.evals = ml_collections.ConfigDict(dict(
      eval=dict(type="classification", every=500)))

  # Initialisation from a checkpoint (fine-tuning).
  c.init = config_dict.placeholder(str)  # .npz file or a workdir.
  c.init_head = True    # Load the head when its shape fits; else zeros.
  c.resample_posemb = False
  c.dont_load = ()      # Regexes of parameters to keep from random init.

  return c


_FLOAT32_MAX = 3.4028234663852886e38


def _number(config, field, example, *, integer=False, minimum=None,
            above=None, below=None, maximum=None, optional=False,
            float32=False):
  """One field checked: a finite number in range, else a one-line Error.

  `float32`: the value is used in float32 and must be finite there too.
  """
  value = config
  for part in field.split("."):
    value = value.get(part) if hasattr(value, "get") else None
  if value is None:
    if optional:
      return
    raise Error(f"--config.{field} is not set: set it, e.g. "
                f"--config.{field}={example}")
  bad = isinstance(value, bool) or not isinstance(value, (int, float))
  if not bad:
    bad = (not math.isfinite(value) or
           (float32 and abs(value) > _FLOAT32_MAX) or
           (integer and float(value) != int(value)) or
           (minimum is not None and value < minimum) or
           (above is not None and value <= above) or
           (below is not None and value >= below) or
           (maximum is not None and value > maximum))
  if bad:
    rules = [r for r, v in ((f">= {minimum}", minimum), (f"> {above}", above),
                            (f"< {below}", below), (f"<= {maximum}", maximum))
             if v is not None]
    kind = "an integer" if integer else (
        "a number finite in float32 (below 3.4e38)" if float32
        else "a finite number")
    raise Error(f"--config.{field}={value!r} is invalid: it must be {kind}"
                f"{' ' if rules else ''}{' and '.join(rules)}, e.g. "
                f"--config.{field}={example}")


def validate(config):
  """One-line Errors for config values that cannot work, before any work.

  Checks the sizes, steps, learning rate and optimizer numbers and the image
  size (an int or (height, width)); model fields are checked by the model.
  """
  from vit_jax import sizes  # pylint: disable=g-import-not-at-top
  _number(config, "batch_size", 512, integer=True, minimum=1)
  _number(config, "eval_batch_size", 512, integer=True, minimum=1,
          optional=True)
  _number(config, "total_steps", 10000, integer=True, minimum=1,
          optional=True)
  _number(config, "total_epochs", 300, above=0, optional=True)
  _number(config, "seed", 0, integer=True, minimum=0, below=2**32)
  for field in ("log_steps", "checkpoint_steps"):
    _number(config, field, 100, integer=True, minimum=0)
  _number(config, "max_to_keep", 3, integer=True, minimum=1)
  _number(config, "label_smoothing", 0.1, minimum=0, below=1, optional=True)
  _number(config, "optim.lr", 0.001, above=0, float32=True)
  _number(config, "optim.end_lr", 0.0, minimum=0, optional=True,
          float32=True)
  _number(config, "optim.warmup_steps", 1000, integer=True, minimum=0)
  _number(config, "optim.weight_decay", 0.05, minimum=0, optional=True)
  _number(config, "optim.clip_norm", 1.0, minimum=0, optional=True)
  _number(config, "optim.accum_steps", 1, integer=True, minimum=1,
          optional=True)
  _number(config, "optim.ema_decay", 0.9999, minimum=0, below=1,
          optional=True)
  _number(config, "optim.layer_decay", 0.75, minimum=0, maximum=1,
          optional=True)
  try:
    sizes.pair(config.image_size, "image_size")
  except ValueError as e:
    raise Error(f"--config.image_size={config.image_size!r} is invalid ({e}):"
                " use e.g. --config.image_size=224 or (224,160)") from None


def resolve_steps(config, num_train_examples):
  """Total training steps from `total_steps` or `total_epochs`."""
  if config.get("total_steps") is not None:
    steps = int(config.total_steps)
  elif config.get("total_epochs") is not None:
    steps = int(math.ceil(
        config.total_epochs * num_train_examples / config.batch_size))
  else:
    raise Error("set either --config.total_steps or --config.total_epochs")
  if steps <= 0:
    raise Error(f"total steps must be positive, got {steps}")
  return steps


def save_config(config, workdir, extra=None):
  """Writes the resolved config (plus `extra` values) to DIR/config.json."""
  d = json.loads(config.to_json_best_effort())
  d.update(extra or {})
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(d, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def load_config(workdir):
  """Reads DIR/config.json back as a ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise Error(f"{workdir} is not a training workdir ({path} not found): "
                "pass the --workdir of a `python -m vit_jax.main` run")
  with open(path) as f:
    d = json.load(f)
  return ml_collections.ConfigDict(_tuplify(d))


def _tuplify(x):
  """JSON lists back to tuples (configs use tuples, not lists)."""
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x
