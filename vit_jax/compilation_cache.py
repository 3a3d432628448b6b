"""The persistent compilation cache: compiled XLA programs kept on disk.

A run that compiles a function another run (or an earlier attempt of the
same run) already compiled loads the program from the cache instead of
compiling it again, so a resumed or repeated run starts training sooner.
The training command line (`vit_jax.main`) turns it on by default in a
per-user directory, `default_dir()`; a sweep (`vit_jax.sweep`) shares one
in `ROOT/.jax_cache` between its points.

JAX reads the cache directory when it first compiles: call `setup` before
anything is compiled. Only programs that take at least
`MIN_COMPILE_SECONDS` to compile are stored (the training, evaluation and
few-shot steps; not the single operations run eagerly). The directory is
trusted: executables are loaded from it, so it is created readable and
writable by its owner only.
"""

import os

ENV = "VIT_JAX_CACHE"
MIN_COMPILE_SECONDS = 0.1
# The directory `setup` last gave JAX.
_chosen = None


def default_dir():
  """$VIT_JAX_CACHE, else $XDG_CACHE_HOME/vit_jax/xla, else
  ~/.cache/vit_jax/xla."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "vit_jax", "xla")


def setup(directory=None, default=None, log=print):
  """Points JAX's persistent compilation cache at a directory.

  Args:
    directory: the cache directory; "" turns the cache off. None: the
      directory JAX was given outside of `setup` (JAX_COMPILATION_CACHE_DIR,
      or the program's own `jax.config`), else `default`, else the one an
      earlier `setup` of this process chose (e.g. the sweep running this
      training), else `default_dir()`.
    default: the directory for `directory=None` (a sweep's ROOT/.jax_cache).
    log: called with one line for a directory that cannot be created
      (None: silent).

  Returns:
    The directory in use, or None when the cache is off. A directory that
    cannot be created leaves the cache off (with the warning), it does not
    raise.
  """
  global _chosen
  import jax  # pylint: disable=g-import-not-at-top
  if directory is None:
    current = jax.config.jax_compilation_cache_dir
    if current and current != _chosen:
      directory = current
    else:
      directory = default or current or default_dir()
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
      raise PermissionError("not writable")
  except OSError as e:
    if log:
      log(f"warning: cannot use the compilation cache directory {directory} "
          f"({getattr(e, 'strerror', None) or e}): compiling without a cache"
          " (--compilation_cache=DIR picks another, '' turns it off)")
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  _chosen = directory
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_SECONDS)
  return directory


def current():
  """The directory JAX's compilation cache is set to, or None when off."""
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_enable_compilation_cache:
    return None
  return jax.config.jax_compilation_cache_dir or None
