"""Device mesh, partition rules and global arrays.

The mesh has two named axes, "data" and "model". Batches are split over
"data". Parameters (and everything shaped like them: optimizer state, EMA)
get a PartitionSpec from

1. regex partition rules on the `/`-joined path (tensor parallelism over
   "model": attention heads and MLP hidden units, see
   `config_utils.DEFAULT_PARTITION_RULES`), then
2. FSDP, when enabled: a leaf with at least `fsdp_min_size` elements is also
   split over "data" along its largest axis that is still free and divisible
   by the "data" axis size.

Everything else is replicated.
"""

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import errors
from vit_jax import optim


def maybe_initialize_distributed(requested=False):
  """Calls `jax.distributed.initialize` when asked or set by the environment.

  Asked: `requested` (the --distributed flag or `config.distributed`), or the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (all three, e.g. for several processes on one machine).
  On CPU the collectives use gloo.

  Returns:
    True when jax.distributed was initialised.
  """
  env = os.environ
  addr = env.get("JAX_COORDINATOR_ADDRESS")
  nproc = env.get("JAX_NUM_PROCESSES")
  pid = env.get("JAX_PROCESS_ID")
  if not (requested or addr):
    return False
  if jax.distributed.is_initialized():
    return True
  if "cpu" in env.get("JAX_PLATFORMS", "").split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if addr:
    if nproc is None or pid is None:
      raise errors.Error(
          "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES or "
          "JAX_PROCESS_ID is not: set all three")
    kwargs = dict(coordinator_address=addr, num_processes=int(nproc),
                  process_id=int(pid))
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
    raise errors.Error(
        f"cannot join a multi-process run ({first}): set JAX_COORDINATOR_"
        "ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run where JAX "
        "detects the cluster (e.g. SLURM); drop --distributed for one "
        "process") from None
  return True


def make_mesh(axes, devices=None):
  """Mesh from `(("data", -1), ("model", 1))`-like specs (-1: the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(n) for n, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sorted(names) != ["data", "model"]:
    raise errors.Error(
        f"mesh axes must be named 'data' and 'model', got {names}")
  if sizes.count(-1) > 1:
    raise errors.Error(f"at most one mesh axis may be -1, got {axes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise errors.Error(
          f"mesh {tuple(axes)} does not fit {len(devices)} devices: "
          "use axis sizes whose product divides the device count")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise errors.Error(
        f"mesh {tuple(axes)} needs {int(np.prod(sizes))} devices but there "
        f"are {len(devices)}: change --config.mesh")
  return Mesh(np.array(devices).reshape(sizes), names)


def _rule_spec(path, ndim, rules):
  """PartitionSpec entries from the first matching rule, or all None."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = tuple(spec)
      if len(spec) < ndim:  # Stacked (scanned) blocks: leading depth axis.
        spec = (None,) * (ndim - len(spec)) + spec
      if len(spec) == ndim:
        return list(spec)
  return [None] * ndim


def partition_spec(path, shape, mesh, rules=(), fsdp_min_size=None):
  """The PartitionSpec of one array."""
  spec = _rule_spec(path, len(shape), rules)
  for i, name in enumerate(spec):  # Drop axes that do not divide evenly.
    if name is not None and shape[i] % mesh.shape[name]:
      spec[i] = None
  data = mesh.shape["data"]
  if (fsdp_min_size is not None and data > 1 and shape
      and int(np.prod(shape)) >= fsdp_min_size and "data" not in spec):
    free = [i for i in range(len(shape))
            if spec[i] is None and shape[i] % data == 0]
    if free:
      spec[max(free, key=lambda i: shape[i])] = "data"
  return P(*spec)


def tree_shardings(tree, mesh, rules=(), fsdp_min_size=None):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""

  def leaf(keypath, x):
    shape = tuple(getattr(x, "shape", ()))
    return NamedSharding(mesh, partition_spec(
        optim.path_str(keypath), shape, mesh, rules, fsdp_min_size))

  return jax.tree_util.tree_map_with_path(leaf, tree)


def shardings_from_config(tree, mesh, config):
  """`tree_shardings` with the config's rules and FSDP setting."""
  return tree_shardings(
      tree, mesh, rules=tuple(config.partition_rules),
      fsdp_min_size=int(config.fsdp_min_size) if config.fsdp else None)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P("data"))


def to_global(batch, mesh):
  """Host-local numpy batch -> global jax arrays split over "data"."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def check_batch_size(global_batch, mesh, what="batch_size"):
  """The global batch must split evenly over data devices and processes."""
  n = mesh.shape["data"]
  if global_batch % n:
    raise errors.Error(
        f"{what}={global_batch} is not divisible by the {n} devices of the "
        f"'data' mesh axis: use a multiple of {n}")
  if global_batch % jax.process_count():
    raise errors.Error(
        f"{what}={global_batch} is not divisible by the "
        f"{jax.process_count()} processes")


def to_numpy(tree):
  """Fully-addressable numpy copies of (possibly sharded) arrays."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, tree)
