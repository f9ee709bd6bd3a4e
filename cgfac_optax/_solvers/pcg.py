r"""``"pcg"``: CG on the factors, preconditioned by inverses of (possibly older) factors.

The operator is the current ``(A \otimes G + \gamma I) V = A V G + \gamma V``
with exact damping, two matmuls. The preconditioner is K-FAC's own
approximation with *factored* damping (Martens & Grosse 2015, sec. 6.3),

.. math::

  M^{-1} R = (A + \pi \sqrt{\gamma} I)^{-1}\, R\, (G + \tfrac{\sqrt{\gamma}}{\pi} I)^{-1},
  \qquad \pi = \sqrt{\frac{\operatorname{tr}(A) / d_A}{\operatorname{tr}(G) / d_G}},

two matmuls with inverses formed at the last refresh. So an iteration is
four matmuls and no decomposition: the inverses (an LU each, several times
cheaper than an eigendecomposition on every backend, and far cheaper on CPU)
are refreshed on a schedule with curvature memory (:mod:`cgfac_optax._memory`),
and the one or two warm-started iterations correct both the factored damping
and the drift of the averaged factors since then. Flops per step: forming the
factors, ``(m + 1)`` operator and preconditioner applications,
``4 (m + 1) d_A d_G (d_A + d_G)``, and the inverses counted whole (``2 (d_A^3 +
d_G^3)``; their refresh interval divides them in practice); memory
``2 (d_A^2 + d_G^2)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers import cg_materialized
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  FactorCurvature,
  Factors,
  Solver,
  form_factors_flops,
  matmul,
)
from cgfac_optax._solvers.cg_materialized import FactorsData


class Inverses(NamedTuple):
  """``(A + pi sqrt(gamma) I)^{-1}`` and ``(G + sqrt(gamma)/pi I)^{-1}``."""

  a: jax.Array  # d_A x d_A
  g: jax.Array  # d_G x d_G


class PreconditionedData(NamedTuple):
  operator: FactorsData
  inverses: Inverses


def _mean_trace(x: jax.Array) -> jax.Array:
  return jnp.trace(x) / x.shape[0]


def factored_shifts(mean_trace_a, mean_trace_g, damping, dtype) -> tuple[jax.Array, jax.Array]:
  """``(pi sqrt(gamma), sqrt(gamma) / pi)`` from the factors' mean eigenvalues ``tr / d``."""
  root = jnp.sqrt(jnp.asarray(damping, dtype))
  ta, tg = mean_trace_a, mean_trace_g
  ok = (ta > 0) & (tg > 0) & jnp.isfinite(ta) & jnp.isfinite(tg)
  pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1), 1)), 1)
  # Bound pi so that neither factor's damping vanishes in its precision.
  pi = jnp.clip(pi, 1e-4, 1e4)
  return pi * root, root / pi


def factored_inverses(f: Factors, damping) -> Inverses:
  """The factored-damping inverses (the formula in the module docstring)."""
  dtype = f.a.dtype
  shift_a, shift_g = factored_shifts(_mean_trace(f.a), _mean_trace(f.g), damping, dtype)

  def inverse(x, shift):
    inv = jnp.linalg.inv(x + shift * jnp.eye(x.shape[0], dtype=dtype))
    return 0.5 * (inv + inv.T)

  return Inverses(inverse(f.a, shift_a), inverse(f.g, shift_g))


def prepare(
  curvature: FactorCurvature, damping, arithmetic: Arithmetic = ACCURATE
) -> PreconditionedData:
  operator = cg_materialized.prepare(curvature, damping, arithmetic)
  return PreconditionedData(operator, curvature.refreshed)


def operator(data: PreconditionedData, v: jax.Array) -> jax.Array:
  return cg_materialized.operator(data.operator, v)


def apply_inverses(inverses: Inverses, r: jax.Array, arithmetic: Arithmetic) -> jax.Array:
  return matmul(matmul(inverses.a, r, arithmetic), inverses.g, arithmetic)


def preconditioner(data: PreconditionedData, r: jax.Array) -> jax.Array:
  return apply_inverses(data.inverses, r, data.operator.arithmetic)


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  n = float(shape.d_a) * shape.d_g
  # An LU inverse, 2 k^3, and the shift, trace and symmetrization, a few k^2.
  invert = 2.0 * (shape.d_a**3 + shape.d_g**3) + 4.0 * (shape.d_a**2 + shape.d_g**2)
  iterations = (cg_iters + 1) * 4 * n * (shape.d_a + shape.d_g)
  return form_factors_flops(shape, data_shards) + invert + iterations


def memory(shape: LayerShape) -> int:
  return 2 * (shape.d_a**2 + shape.d_g**2)


PCG = Solver(
  name="pcg",
  curvature="factors",
  refresh=factored_inverses,
  prepare=prepare,
  operator=operator,
  preconditioner=preconditioner,
  diagonal=None,
  solve=None,
  flops=flops,
  memory=memory,
  communication=cg_materialized.communication,
  matrix_free=False,
  exact=True,
)
