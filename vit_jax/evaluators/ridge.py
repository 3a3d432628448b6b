"""Closed-form ridge regression for few-shot linear evaluation.

The few-shot metric of the ViT paper fits regularized least squares from frozen
features to targets in {-1, 1}^K and classifies by argmax. For a design matrix
X (N rows, R = D + 1 columns: whitened features plus a bias column) and targets
Y (N x K) the solution for a penalty l2 is

  W(l2) = (XᵀX + l2 I)⁻¹ XᵀY = Xᵀ(XXᵀ + l2 I)⁻¹ Y.

One symmetric eigendecomposition serves every l2 value:

  primal (N >= R):  XᵀX = Q Λ Qᵀ,  W = Q · diag(1/(λ + l2)) · QᵀXᵀY
  dual   (N <  R):  XXᵀ = U Λ Uᵀ,  W = XᵀU · diag(1/(λ + l2)) · UᵀY

so W = lhs · diag(1/(λ + l2)) · rhs. The bias column is penalised like every
other column (the objective of scikit-learn's `Ridge(fit_intercept=False)` on
the same design).

The penalty is chosen without the test split, by exact leave-one-out (LOO) on
the few-shot training set. With the hat matrix H = X(XᵀX + l2 I)⁻¹Xᵀ, the
residual of the model refitted without example i is

  r_i = (y_i - ŷ_i) / (1 - h_ii),

and the LOO prediction is y_i - r_i. In the dual both numerator and
denominator carry a factor l2 (Uᵀ is orthogonal), which cancels:

  r = (U diag(1/(λ + l2)) Uᵀ Y) / (Σ_k U_ik² / (λ_k + l2)),

a form without the cancellation of 1 - h_ii when h_ii is close to 1. In the
primal h_ii = Σ_k A_ik² / (λ_k + l2) with A = XQ.

Everything here is plain jnp: jit it, vmap it over seeds or l2 values.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import config_utils

# Penalties searched by leave-one-out: 2^-10, 2^-9, ..., 2^20.
L2_GRID = config_utils.FEWSHOT_L2_GRID
# The fixed penalty of the ViT paper's few-shot numbers.
FIXED_L2 = 2.0**10


class Eigen(NamedTuple):
  """One eigendecomposition of the design, shared by every l2 value.

  Attributes:
    eigs: [r] eigenvalues of XᵀX (primal) or XXᵀ (dual), clipped at 0.
    lhs: [R, r] Q (primal) or XᵀU (dual).
    rhs: [r, K] QᵀXᵀY (primal) or UᵀY (dual).
    basis: [N, r] XQ (primal) or U (dual); used for leave-one-out.
  """
  eigs: jax.Array
  lhs: jax.Array
  rhs: jax.Array
  basis: jax.Array

  @property
  def dual(self) -> bool:
    # Static: the dual basis is square (N x N), the primal one N x R with
    # N >= R; they coincide only when N == R, which is solved in the primal.
    return self.basis.shape[0] < self.lhs.shape[0]


def whitening(x, eps=1e-5):
  """Mean and inverse scale of the columns of `x` (the few-shot train set).

  Features are centred by the mean and divided by std + eps. Columns that are
  constant on `x` (std <= 1e-6 (1 + |mean|), i.e. zero up to float32
  rounding) carry no information; their scale is 0 instead of 1/eps so that
  test features are not amplified by 1/eps (raw pixels at an image border are
  an example).

  Args:
    x: [N, D] features.
    eps: added to the standard deviation.

  Returns:
    (mean, scale), both [D].
  """
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0)
  constant = std <= 1e-6 * (1.0 + jnp.abs(mean))
  scale = jnp.where(constant, 0.0, 1.0 / (std + eps))
  return mean, scale


def design(x, mean, scale, bias=1.0):
  """Whitened features with a constant bias column appended: [N, D + 1]."""
  x = (jnp.asarray(x, jnp.float32) - mean) * scale
  return jnp.concatenate([x, jnp.full((x.shape[0], 1), bias, x.dtype)], axis=1)


def targets(labels, num_classes):
  """Targets in {-1, 1}^K from integer labels."""
  return 2.0 * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0


def eigen(x, y):
  """Eigendecomposition of the design `x` [N, R] with targets `y` [N, K].

  Primal when N >= R (eigh of the R x R matrix XᵀX), dual otherwise (eigh of
  the N x N matrix XXᵀ): always the smaller of the two.
  """
  n, r = x.shape
  hi = jax.lax.Precision.HIGHEST
  if n >= r:
    eigs, q = jnp.linalg.eigh(jnp.matmul(x.T, x, precision=hi))
    xq = jnp.matmul(x, q, precision=hi)
    rhs = jnp.matmul(xq.T, y, precision=hi)
    return Eigen(jnp.maximum(eigs, 0.0), q, rhs, xq)
  eigs, u = jnp.linalg.eigh(jnp.matmul(x, x.T, precision=hi))
  lhs = jnp.matmul(x.T, u, precision=hi)
  rhs = jnp.matmul(u.T, y, precision=hi)
  return Eigen(jnp.maximum(eigs, 0.0), lhs, rhs, u)


def weights(e: Eigen, l2):
  """Ridge weights [R, K] for one penalty: lhs · diag(1/(λ + l2)) · rhs."""
  return jnp.matmul(e.lhs, e.rhs / (e.eigs + l2)[:, None],
                    precision=jax.lax.Precision.HIGHEST)


def loo_residuals(e: Eigen, y, l2):
  """Exact leave-one-out residuals [N, K] for one penalty.

  Row i is y_i minus the prediction for x_i of the ridge model fitted on all
  examples but i.
  """
  hi = jax.lax.Precision.HIGHEST
  inv = 1.0 / (e.eigs + l2)
  if e.dual:
    # (Y - ŷ) / (1 - h) with the common factor l2 cancelled (see module doc).
    num = jnp.matmul(e.basis, e.rhs * inv[:, None], precision=hi)
    den = jnp.matmul(jnp.square(e.basis), inv, precision=hi)
    return num / den[:, None]
  fitted = jnp.matmul(e.basis, e.rhs * inv[:, None], precision=hi)
  leverage = jnp.matmul(jnp.square(e.basis), inv, precision=hi)
  return (y - fitted) / (1.0 - leverage)[:, None]


def loo_errors(e: Eigen, y, l2s):
  """LOO classification error and squared error per penalty.

  Args:
    e: the eigendecomposition of the design.
    y: [N, K] targets in {-1, 1}.
    l2s: [L] penalties.

  Returns:
    (error, sq_error), both [L]: the fraction of examples whose LOO prediction
    (y_i - r_i) has its argmax on a wrong class, and the mean over examples of
    the summed squared LOO residual.
  """
  labels = jnp.argmax(y, axis=-1)

  def one(l2):
    res = loo_residuals(e, y, l2)
    pred = jnp.argmax(y - res, axis=-1)
    return (jnp.mean(pred != labels),
            jnp.mean(jnp.sum(jnp.square(res), axis=-1)))

  return jax.vmap(one)(l2s)


def select(error, sq_error):
  """Index of the best penalty: least LOO error, ties by least squared error.

  Among exact ties on both the smallest index (the smallest penalty) wins.
  """
  # Lexicographic argmin: rank by error, then by sq_error among the minimal.
  best = error == jnp.min(error)
  return jnp.argmin(jnp.where(best, sq_error, jnp.inf))


def evaluate(x_train, labels_train, x_test, labels_test, l2s, *,
             num_classes, eps=1e-5, bias=1.0, loo=True):
  """Few-shot ridge evaluation for all penalties from one eigendecomposition.

  Args:
    x_train: [N, D] few-shot training features.
    labels_train: [N] int labels.
    x_test: [T, D] test features.
    labels_test: [T] int labels.
    l2s: [L] penalties.
    num_classes: K (static under jit).
    eps: whitening epsilon.
    bias: value of the bias column.
    loo: also compute the leave-one-out errors and choice (static).

  Returns:
    dict with "accuracy" [L] (test accuracy per penalty) and, with `loo`,
    "loo_error" [L], "loo_sq_error" [L] and "best" (index into l2s chosen by
    leave-one-out).
  """
  mean, scale = whitening(x_train, eps)
  xtr = design(x_train, mean, scale, bias)
  xte = design(x_test, mean, scale, bias)
  y = targets(labels_train, num_classes)
  e = eigen(xtr, y)
  l2s = jnp.asarray(l2s, jnp.float32)
  # Test scores per penalty: (xte · lhs) · diag(1/(λ + l2)) · rhs.
  proj = jnp.matmul(xte, e.lhs, precision=jax.lax.Precision.HIGHEST)

  def accuracy(l2):
    scores = jnp.matmul(proj, e.rhs / (e.eigs + l2)[:, None],
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.mean(jnp.argmax(scores, axis=-1) == labels_test)

  result = {"accuracy": jax.vmap(accuracy)(l2s)}
  if loo:
    error, sq_error = loo_errors(e, y, l2s)
    result.update(loo_error=error, loo_sq_error=sq_error,
                  best=select(error, sq_error))
  return result


def fit_predict(x_train, labels_train, x_test, l2, *, num_classes, eps=1e-5,
                bias=1.0):
  """Test scores [T, K] of the ridge model for one penalty (for inspection)."""
  mean, scale = whitening(x_train, eps)
  xtr = design(x_train, mean, scale, bias)
  e = eigen(xtr, targets(labels_train, num_classes))
  return design(x_test, mean, scale, bias) @ weights(e, l2)


def l2_index(l2s, l2):
  """Index of `l2` in the sequence `l2s`; raises a clear error if absent."""
  l2s = np.asarray(l2s, np.float64)
  hits = np.flatnonzero(np.isclose(l2s, l2, rtol=1e-6, atol=0))
  if not hits.size:
    raise ValueError(f"l2={l2} is not in the l2 grid {l2s.tolist()}: add it to "
                     "the grid (config.l2_grid) or change config.fixed_l2")
  return int(hits[0])
