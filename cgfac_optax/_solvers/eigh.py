r"""``"eigh"``: standard K-FAC, exact damping from eigendecomposed factors.

With ``A = Q_A diag(l_A) Q_A^T`` and ``G = Q_G diag(l_G) Q_G^T`` (the refreshed
data: with curvature memory, the decomposition of the factors at the last
refresh, standard K-FAC's amortized inverse),

.. math::

  (A \otimes G + \gamma I)^{-1} V
    = Q_A \big[(Q_A^\top V Q_G) / (l_A l_G^\top + \gamma)\big] Q_G^\top ,

elementwise division. Forming and decomposing the factors costs
``2 B (d_A^2 + d_G^2) + 9 (d_A^3 + d_G^3)`` flops, the solve ``4 d_A d_G (d_A + d_G)``;
memory ``2 (d_A^2 + d_G^2)``. Flops flatter it: an eigendecomposition runs well
below matmul throughput on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers import cg_materialized
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  EigenData,
  EigenFactors,
  FactorCurvature,
  Factors,
  Solver,
  damped_eigenvalues,
  eig_flops,
  form_factors_flops,
  from_eigenbasis,
  in_eigenbasis,
)


def eigenbasis(f: Factors, damping=None) -> EigenFactors:
  """Eigendecompositions of both factors, eigenvalues clipped at 0 (they are PSD).

  The damping is left out (zero): it is the current one's to add at ``prepare``.
  """
  l_a, q_a = jnp.linalg.eigh(f.a)
  l_g, q_g = jnp.linalg.eigh(f.g)
  zero = jnp.zeros([], l_a.dtype)
  return EigenFactors(q_a, jnp.maximum(l_a, 0), q_g, jnp.maximum(l_g, 0), zero)


def prepare(curvature: FactorCurvature, damping, arithmetic: Arithmetic = ACCURATE) -> EigenData:
  """The eigenbasis (fresh, or kept from the last refresh with curvature memory) and damping."""
  b = curvature.refreshed
  return EigenData(b._replace(damping=jnp.asarray(damping, b.l_a.dtype)), arithmetic)


def solve(data: EigenData, v: jax.Array) -> jax.Array:
  return from_eigenbasis(data, in_eigenbasis(data, v) / damped_eigenvalues(data))


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  n = float(shape.d_a) * shape.d_g
  decompose = eig_flops(shape.d_a) + eig_flops(shape.d_g)
  return form_factors_flops(shape, data_shards) + decompose + 4 * n * (shape.d_a + shape.d_g)


def memory(shape: LayerShape) -> int:
  return 2 * (shape.d_a**2 + shape.d_g**2)


EIGH = Solver(
  name="eigh",
  curvature="factors",
  refresh=eigenbasis,
  prepare=prepare,
  operator=None,
  preconditioner=None,
  diagonal=None,
  solve=solve,
  flops=flops,
  memory=memory,
  communication=cg_materialized.communication,
  matrix_free=False,
  exact=True,
)
