"""Plug-ins by name: a module of one of our packages, or any importable one.

`load("vit_jax.tasks", "simmim")` imports `vit_jax.tasks.simmim`;
`load("vit_jax.tasks", "my_task")` falls back to a module `my_task` on the
Python path, and a dotted name (`my_pkg.my_task`) is imported as it is.
"""

import importlib


def load(package, name):
  """The module of plug-in `name`; None when no such module exists."""
  candidates = [name] if "." in name else [f"{package}.{name}", name]
  for module_name in candidates:
    try:
      return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name != module_name:  # The module exists but an import inside fails.
        raise
  return None
