r"""``"lowrank"``: exact solve from thin eigenbases of the ``B x B`` Gram matrices.

``rank(A), rank(G) <= B``. With ``a a^T = U diag(s) U^T``, the columns of
``W_A = a^T U diag(s)^{-1/2}`` are orthonormal eigenvectors of ``a^T a`` with
eigenvalues ``s``, so ``A = W_A diag(l_A) W_A^T`` with ``l_A = s_A s`` (likewise
for ``G``) without forming ``A``. Then, with ``C = W_A^T V W_G``,

.. math::

  (A \otimes G + \gamma I)^{-1} V
    = W_A \big[C / (l_A l_G^\top + \gamma)\big] W_G^\top + (V - P V) / \gamma ,

``P`` the projection on the bases' span. The remainder ``V - P V`` is
projected out twice: forming ``V/\gamma`` and ``W C W^T/\gamma`` separately
would cancel catastrophically for a tiny damping (an error of
``eps ||V|| / gamma`` inside the span). Flops ``10 B n + 2 B^2 (5 d_A + 4 d_G) +
2 \cdot 9 B^3``, memory ``B (d_A + d_G) + 2 B^2``: about two and a half
matrix-free products, exact, and never anything of size ``d^2``. Its ground:
few rows and wide layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cgfac_optax._layers import CurvatureRows, LayerShape
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  EigenData,
  EigenFactors,
  Solver,
  damped_eigenvalues,
  eig_flops,
  from_eigenbasis,
  in_eigenbasis,
  matmul,
)


def thin_eigenbasis(
  x: jax.Array, scale, arithmetic: Arithmetic = ACCURATE
) -> tuple[jax.Array, jax.Array]:
  """Orthonormal eigenvectors of ``scale x^T x`` and their eigenvalues, from ``x x^T``.

  Directions whose eigenvalue is at rounding level are dropped (their column
  is set to zero), so rank-deficient rows never divide by zero.
  """
  s, u = jnp.linalg.eigh(matmul(x, x.T, arithmetic))
  eps = jnp.finfo(x.dtype).eps
  keep = s > eps * x.shape[0] * jnp.max(jnp.abs(s), initial=0.0)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, s, 1.0)), 0.0)
  basis = matmul(x.T, u * inv_sqrt, arithmetic)
  return basis, jnp.where(keep, s, 0.0) * scale


def prepare(rows: CurvatureRows, damping, arithmetic: Arithmetic = ACCURATE) -> EigenData:
  """Thin eigenbases of both factors from the rows (kept in the solve's dtype)."""
  q_a, l_a = thin_eigenbasis(rows.a, rows.scale_a, arithmetic)
  q_g, l_g = thin_eigenbasis(rows.g, rows.scale_g, arithmetic)
  damping = jnp.asarray(damping, rows.a.dtype)
  return EigenData(EigenFactors(q_a, l_a, q_g, l_g, damping), arithmetic)


def solve(data: EigenData, v: jax.Array) -> jax.Array:
  c = in_eigenbasis(data, v)
  rest = v - from_eigenbasis(data, c)
  rest = rest - from_eigenbasis(data, in_eigenbasis(data, rest))
  return from_eigenbasis(data, c / damped_eigenvalues(data)) + rest / data.basis.damping


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  b, d_a, d_g = float(shape.rows), shape.d_a, shape.d_g
  grams = 4 * b * b * (d_a + d_g)  # x x^T and x^T U for both sides, split over the shards
  on_bases = 10 * b * d_a * d_g + 2 * b * b * (5 * d_a + 4 * d_g) - grams
  return grams / data_shards + on_bases + 2 * eig_flops(shape.rows)


def memory(shape: LayerShape) -> int:
  return shape.rows * (shape.d_a + shape.d_g) + 2 * shape.rows**2


def communication(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  """The rows and the Grams' eigenvectors are gathered and the thin bases reduced."""
  if data_shards <= 1:
    return 0.0
  b = float(shape.rows)
  return 2 * b * (shape.d_a + shape.d_g) + 2 * b * b + 2 * b * b / data_shards


LOWRANK = Solver(
  name="lowrank",
  curvature="rows",
  refresh=None,
  prepare=prepare,
  operator=None,
  preconditioner=None,
  diagonal=None,
  solve=solve,
  flops=flops,
  memory=memory,
  communication=communication,
  matrix_free=True,
  exact=True,
)
