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


def _cpuinfo():
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  fields = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def cpu_model():
  """The CPU's model name with its family and model numbers (a generic name
  such as "Intel(R) Xeon(R) Processor" covers several generations)."""
  info = _cpuinfo()
  name = info.get("model name") or platform.processor() or platform.machine()
  if "cpu family" in info and "model" in info:
    name += f" (family {info['cpu family']} model {info['model']})"
  return name or "unknown"


def cpu_flags():
  """The CPU's vector extensions that change XLA's and BLAS's kernels."""
  have = set(_cpuinfo().get("flags", "").split())
  return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
          if f in have]


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
