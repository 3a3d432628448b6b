"""XLA compiler options of our jitted training and inference steps.

They are passed per function (`jax.jit(..., compiler_options=...)`), never
through the global `XLA_FLAGS`, and the training loop logs them. Each one is
here because an interleaved benchmark showed it helps (docs/benchmarks.md,
"Training step on CPU"):

- CPU: `xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE`.
  By default XLA hands matrix multiplications, reductions and elementwise
  fusions to its YNNPACK library; its matrix multiplications are slower than
  XLA's own (Eigen) ones on the ViT's shapes, while its reductions (layer
  norm, softmax) are faster than XLA's loop emitter. Keeping YNNPACK for
  reductions only is the fastest of the combinations measured.

Other backends get no options. `VIT_JAX_XLA_OPTIONS=none` in the environment
turns them off (to compare, or if a future XLA no longer knows a name).
"""

import os
from typing import Dict, Optional

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
}


def for_backend(backend: Optional[str] = None) -> Dict[str, str]:
  """The compiler options for `backend` (default: JAX's default backend)."""
  if os.environ.get("VIT_JAX_XLA_OPTIONS", "").lower() == "none":
    return {}
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend()
  return dict(CPU_OPTIONS) if backend == "cpu" else {}


def describe(options: Dict[str, str]) -> str:
  """One line for the log: `name=value, ...` or `none`."""
  return ", ".join(f"{k}={v}" for k, v in options.items()) or "none"
