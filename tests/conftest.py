"""Test setup: 8 simulated CPU devices, set before jax is imported."""

import os

# The simulated devices of one process are threads that meet at every
# collective. XLA aborts the whole process (SIGABRT) when one of them is
# more than 20 + 20 s late, which happens on a loaded 2-core machine while
# another test's threads run; wait up to 2 + 30 minutes instead (a stuck
# collective still ends the run, at pytest's own limits).
COLLECTIVE_TIMEOUTS = (
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_cpu_collective_call" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + COLLECTIVE_TIMEOUTS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# Commands run by the tests (in this process or in subprocesses) share one
# persistent compilation cache of their own, not the user's.
os.environ.setdefault("VIT_JAX_CACHE",
                      tempfile.mkdtemp(prefix="vit_jax_test_cache_"))

_CACHE_OPTIONS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                  "jax_persistent_cache_min_compile_time_secs")


@pytest.fixture(autouse=True)
def _restore_compilation_cache_options():
  """A command run in this process turns the compilation cache on for the
  process; later tests get the options back as they were."""
  import jax  # pylint: disable=g-import-not-at-top
  saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
