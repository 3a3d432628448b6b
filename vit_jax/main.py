r"""Command line: train, evaluate, checkpoint and resume an experiment config.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/vit.py:B/16,cifar10 \
      --config.init=ViT-B_16.npz --workdir=/tmp/ft [--config.field=value ...]
  python -m vit_jax.main --config=configs/digits.py [--config.field=value ...] \
      --show_config

Every field of the config is set with `--config.<field>=<value>` (nested ones
with dots: `--config.optim.lr=1e-3`); `--show_config` prints them all with
their values, overrides applied, and exits. The ones most often set:
`total_steps` (or `total_epochs`), `batch_size`, `optim.lr`,
`optim.warmup_steps`, `optim.weight_decay`, `seed`, `dataset`, `data_dir`,
`image_size`, `model_name` and `model.*` (e.g. `model.classifier=gap`),
`init` (a checkpoint to fine-tune), `log_steps`, `checkpoint_steps`,
`evals.<name>.every` and `progress` (True: a progress bar on a terminal,
plain lines every `log_steps` in a log file; False: plain lines always).

A run ends with a summary: the final metrics, its time, the newest checkpoint
and the commands to run next on the workdir. Running the same command again
resumes from the newest checkpoint in the workdir. Relative paths (the
workdir, `--config.init`, `--config.data_dir`, a `folder:` dataset) are taken
from the current directory and recorded absolute in DIR/config.json. Compiled
programs are kept in a persistent compilation cache
(`--compilation_cache=DIR`; default $VIT_JAX_CACHE, else
$XDG_CACHE_HOME/vit_jax/xla or ~/.cache/vit_jax/xla; '' turns it off), so a
repeated or resumed run does not compile them again. Several processes (hosts)
join with `--distributed` (or `config.distributed`, or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
variables).

Problems the user can fix are printed as one line `error: <message>` and the
exit status is 1.
"""

import re
import sys

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vit_jax import cli_help
from vit_jax import compilation_cache
from vit_jax import config_utils
from vit_jax import errors
from vit_jax import paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<name>.py[:arg].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the config.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of the persistent compilation cache ('' turns it off; "
    "default: $VIT_JAX_CACHE, else $XDG_CACHE_HOME/vit_jax/xla, else "
    "~/.cache/vit_jax/xla).")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print the config's fields with their values (the "
    "--config file with its --config.* overrides), one `field = value` a "
    "line, and exit without training (no --workdir needed).")
# The flags of this command, in the order --help lists them.
FLAG_NAMES = ("config", "workdir", "show_config", "distributed",
              "compilation_cache")


def _fail(message):
  print(f"error: {message}", file=sys.stderr, flush=True)
  return 1


def _parse(argv):
  """Parses flags; returns an error message or None."""
  config_utils.forget_config_overrides(flags.FLAGS)
  flags.FLAGS.unparse_flags()
  sys.argv = list(argv)  # Config overrides are read from sys.argv.
  try:
    flags.FLAGS(argv)
  except errors.Error as e:
    return str(e)
  except (AttributeError, KeyError) as e:  # An override of a missing field.
    # ml_collections: "'name'\nDid you mean \"other\" instead of ...?",
    # escaped once more when an AttributeError wraps the KeyError's text.
    text = str(e.args[0] if e.args else e)
    name = re.match(r"""[\\'"]*([^\\'"\s]*)""", text).group(1)
    close = re.search(r'Did you mean \\?"([^"\\]+)', text)
    detail = f"{name} (did you mean {close.group(1)}?)" if close else name
    return (f"unknown config field {detail}: check the --config.<field> "
            "overrides against the config file (--show_config lists them)")
  except flags.Error as e:
    # A config file's get_config that refused its argument: ml_collections
    # wraps the error in a traceback text; its last line is the message.
    refused = re.search(r"^vit_jax\.errors\.Error: (.*)$", str(e), re.M)
    if refused:
      return refused.group(1)
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return lines[-1] if lines else str(e)
  if _CONFIG.value is None:
    return "pass --config=configs/<name>.py[:arg]"
  try:
    _CONFIG.value.get("seed")  # A file that failed to load raises here.
  except OSError:
    path = next((a.split("=", 1)[1] for a in argv if a.startswith(
        ("--config=", "-config="))), "")
    return (f"cannot load the config file {path.split(':')[0]}: check the "
            "--config path (e.g. configs/digits.py)")
  if not _WORKDIR.value and not _SHOW_CONFIG.value:
    return "pass --workdir=DIR (checkpoints, metrics and config go there)"
  return None


def config_lines(config, prefix=""):
  """`field.sub = value` lines of a config: its fields in its (sorted)
  order, nested ones flattened, values as Python literals."""
  lines = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      lines += config_lines(value, f"{prefix}{key}.")
    else:  # An empty ConfigDict (e.g. optim.kwargs) shows as {}.
      value = {} if isinstance(value, ml_collections.ConfigDict) else value
      lines.append(f"{prefix}{key} = {value!r}")
  return lines


def run(argv):
  """Runs the command line `argv` (argv[0] is the program); returns status."""
  if cli_help.requested(argv):
    return cli_help.show(argv, __doc__, flags.FLAGS, FLAG_NAMES)
  message = _parse(argv)
  if message:
    return _fail(message)
  if _SHOW_CONFIG.value:
    return cli_help.write("\n".join(config_lines(_CONFIG.value)) + "\n")
  logging.set_verbosity(logging.WARNING)
  config = paths.absolute_config(_CONFIG.value)
  workdir = paths.absolute(_WORKDIR.value)
  try:
    from vit_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.maybe_initialize_distributed(
        _DISTRIBUTED.value or bool(config.get("distributed")))
    import jax  # pylint: disable=g-import-not-at-top
    compilation_cache.setup(paths.absolute(_COMPILATION_CACHE.value),
                            log=print if jax.process_index() == 0 else None)
    from vit_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, workdir)
  except errors.Error as e:
    return _fail(e)
  return 0


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
