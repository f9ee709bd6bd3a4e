r"""``"pcg"``: CG on the factors, preconditioned by an eigenbasis of (possibly older) factors.

The operator is the current ``(A \otimes G + \gamma I) V = A V G + \gamma V``, two
matmuls; the preconditioner is the exact damped inverse for the factors at the
basis' last refresh,

.. math::

  M^{-1} R = Q_A \big[(Q_A^\top R Q_G) / (l_A l_G^\top + \gamma)\big] Q_G^\top ,

four matmuls, with the current damping. With the basis of the current factors
``M`` is the operator itself and one iteration solves the system exactly; with
curvature memory (:mod:`cgfac_optax._memory`) the basis is refreshed rarely
and the factors drift slowly between refreshes, so a warm-started solve needs
one or two iterations to correct the drift: a step is matmuls only, and the
eigendecompositions, the slow part of K-FAC on every backend, run a few times
per hundred steps instead of every few steps. Flops per step: forming the
factors, ``(m + 1)`` operator and preconditioner applications,
``6 (m + 1) d_A d_G (d_A + d_G)``, and the eigendecompositions counted whole
(their refresh interval divides them in practice); memory ``3 (d_A^2 + d_G^2)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers import cg_materialized
from cgfac_optax._solvers._base import (
  EigenFactors,
  Solver,
  damped_eigenvalues,
  eig_flops,
  form_factors_flops,
  from_eigenbasis,
  in_eigenbasis,
)
from cgfac_optax._solvers.cg_materialized import FactorsData


class PreconditionedData(NamedTuple):
  operator: FactorsData
  basis: EigenFactors


def prepare(curvature, damping) -> PreconditionedData:
  f, b = curvature.factors, curvature.basis
  damping = jnp.asarray(damping, f.a.dtype)
  return PreconditionedData(
    FactorsData(f.a, f.g, damping), EigenFactors(b.q_a, b.l_a, b.q_g, b.l_g, damping)
  )


def operator(data: PreconditionedData, v: jax.Array) -> jax.Array:
  return cg_materialized.operator(data.operator, v)


def preconditioner(data: PreconditionedData, r: jax.Array) -> jax.Array:
  return from_eigenbasis(data.basis, in_eigenbasis(data.basis, r) / damped_eigenvalues(data.basis))


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  n = float(shape.d_a) * shape.d_g
  decompose = eig_flops(shape.d_a) + eig_flops(shape.d_g)
  iterations = (cg_iters + 1) * 6 * n * (shape.d_a + shape.d_g)
  return form_factors_flops(shape, data_shards) + decompose + iterations


def memory(shape: LayerShape) -> int:
  return 3 * (shape.d_a**2 + shape.d_g**2)


PCG = Solver(
  name="pcg",
  curvature="factors",
  uses_basis=True,
  prepare=prepare,
  operator=operator,
  preconditioner=preconditioner,
  diagonal=None,
  solve=None,
  flops=flops,
  memory=memory,
  communication=cg_materialized.communication,
  matrix_free=False,
)
