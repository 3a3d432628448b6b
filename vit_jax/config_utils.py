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

import json
import math
import os

import ml_collections
from ml_collections import config_dict


class Error(Exception):
  """A problem the user can fix; `main` prints it as one line, no traceback."""


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
  for key in ("num_classes", "image_size"):
    arch.pop(key, None)
  return arch


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
  c.pp = ml_collections.ConfigDict(dict(
      inception_crop=True, crop_area=(0.05, 1.0), flip=True, worker_count=0))
  c.batch_size = 512
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size.
  c.total_steps = config_dict.placeholder(int)
  c.total_epochs = config_dict.placeholder(float)

  # Model: `models.create(model_name, **model)`; configs add the variant's
  # architecture fields so that any of them can be overridden.
  c.model_name = "B/16"
  c.model = ml_collections.ConfigDict(dict(
      classifier="token", posemb="learn", dropout_rate=0.0,
      attention_dropout_rate=0.0, stochastic_depth=0.0, scan=False,
      remat_policy="none",
      dtype="float32",        # Compute dtype; "bfloat16" for mixed precision.
      param_dtype="float32",  # Parameters (and optimizer state) stay fp32.
  ))

  # Loss.
  c.loss = "softmax_xent"  # Or "sigmoid_xent".
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
  ))

  # Devices.
  c.mesh = (("data", -1), ("model", 1))
  c.fsdp = False          # Shard parameters/optimizer state over "data".
  c.fsdp_min_size = 2**16  # Leaves with fewer elements stay replicated.
  c.partition_rules = DEFAULT_PARTITION_RULES
  c.distributed = False   # jax.distributed.initialize() before anything.

  # Schedule of side jobs (0 disables; evaluation and a checkpoint always
  # happen at the end).
  c.log_steps = 50
  c.eval_steps = 500
  c.checkpoint_steps = 500
  c.max_to_keep = 3
  c.progress = True  # tqdm progress bar on process 0.

  # Initialisation from a checkpoint (fine-tuning).
  c.init = config_dict.placeholder(str)  # .npz file or a workdir.
  c.init_head = True    # Load the head when its shape fits; else zeros.
  c.resample_posemb = False
  c.dont_load = ()      # Regexes of parameters to keep from random init.

  # Few-shot evaluation (vit_jax.evaluators.fewshot), a ConfigDict whose
  # `log_steps` is its period (0: only at the end; negative: never, e.g.
  # `--config.fewshot.log_steps=-1` from the command line). None disables it.
  c.fewshot = None

  # Testing aid: SIGKILL the process right after the checkpoint of this step.
  c.debug_stop_after_step = config_dict.placeholder(int)
  return c


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


def as_tuple2(size, name="image_size"):
  """(h, w) from an int or a pair."""
  if isinstance(size, int):
    return (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2:
    raise Error(f"{name} must be an int or (height, width), got {size}")
  return size


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
    raise Error(f"{path} not found: is {workdir} a training workdir?")
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
