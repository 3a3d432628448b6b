"""The machine and software a result was computed on.

Training is bitwise reproducible only on one machine and one software stack:
XLA and the BLAS libraries pick kernels by CPU (AVX-512 and AMX on recent
Intel, AVX2 on AMD EPYC), and a new jax release may fuse differently. A
result recorded with `describe()` says which of those it ran on, so a re-run
can be told apart as "same stack, must match bitwise" or "another machine,
must match within the seeds' spread".
"""

import importlib.metadata
import os
import platform

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "grain", "tensorflow-datasets", "ml-collections")


def cpu_model():
  """The CPU's model name (from /proc/cpuinfo; the platform's name else)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def cpu_flags():
  """The CPU's vector extensions that change XLA's and BLAS's kernels."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
                  if f in have]
  except OSError:
    pass
  return []


def versions(packages=PACKAGES):
  """{package: version} of the installed packages among `packages`."""
  out = {}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def describe():
  """{"cpu", "cpu_flags", "cores", "python", "packages"} of this process."""
  return {"cpu": cpu_model(), "cpu_flags": cpu_flags(),
          "cores": len(os.sched_getaffinity(0)) if hasattr(
              os, "sched_getaffinity") else os.cpu_count(),
          "python": platform.python_version(), "packages": versions()}
