"""Paths from the command line, made absolute once where they are parsed.

Orbax reads and writes checkpoints by absolute path only (its OCDBT
tensorstore spec refuses a relative one), and a run records its paths in
DIR/config.json for later commands that may start in another directory. So
every command line resolves the paths it is given against the current
directory as soon as its flags are parsed, and the code behind it sees
absolute paths only:

    workdir = paths.absolute(FLAGS.workdir)   # None and '' stay as given
    paths.absolute_config(config)             # init, data_dir, folder: datasets
"""

import os

import ml_collections

# A dataset name that holds a path: `folder:ROOT` (see `vit_jax.data`).
FOLDER = "folder:"

# Config fields that hold a file or directory.
PATH_FIELDS = ("init", "data_dir")


def absolute(path):
  """`path` resolved against the current directory (`~` expanded); None and
  '' are returned as given."""
  if not path:
    return path
  return os.path.abspath(os.path.expanduser(str(path)))


def absolute_dataset(name):
  """A dataset name with its path made absolute (`folder:ROOT`); other names
  (digits, tfds names) as given."""
  if isinstance(name, str) and name.startswith(FOLDER):
    return FOLDER + absolute(name[len(FOLDER):])
  return name


def absolute_config(config):
  """Makes the path fields of a ConfigDict absolute, in place.

  The fields are `init` and `data_dir`, the `dataset` name, the sources of a
  few-shot `datasets` list ((name, source, train_split, test_split) entries),
  and the same fields in every entry of `evals`. Other values are left alone
  (a malformed entry is for the config's own checks to report).

  Args:
    config: an `ml_collections.ConfigDict` (locked or not).

  Returns:
    `config`.
  """
  for key in PATH_FIELDS:
    value = config.get(key)
    if isinstance(value, str) and value:
      config[key] = absolute(value)
  if isinstance(config.get("dataset"), str):
    config.dataset = absolute_dataset(config.dataset)
  datasets = config.get("datasets")
  if isinstance(datasets, (tuple, list)):
    config.datasets = type(datasets)(
        type(e)((e[0], absolute_dataset(e[1]), *e[2:]))
        if isinstance(e, (tuple, list)) and len(e) > 1 else e
        for e in datasets)
  evals = config.get("evals")
  if isinstance(evals, ml_collections.ConfigDict):
    for entry in evals.values():
      if isinstance(entry, ml_collections.ConfigDict):
        absolute_config(entry)
  return config
