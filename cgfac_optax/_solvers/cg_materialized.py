r"""``"cg_materialized"``: conjugate gradient on the factors ``A`` and ``G`` formed once a step.

Forming the factors costs ``2 B (d_A^2 + d_G^2)`` flops (split over the data
shards); then each product ``A V G`` is two matmuls, ``2 d_A d_G (d_A + d_G)``
flops, independent of the rows, and no eigendecomposition is needed. Memory
``d_A^2 + d_G^2``. Its ground: many rows and narrow layers (convolution
patches, tokens), where the factors are small and the rows many. With a 16-bit
curvature dtype the factors are formed from rows in it and the operator holds
them in it, accumulating in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import LayerShape
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  Solver,
  curvature_array,
  form_factors_flops,
  matmul,
)


class FactorsData(NamedTuple):
  a: jax.Array  # d_A x d_A, the factor A
  g: jax.Array  # d_G x d_G, the factor G
  damping: jax.Array  # shape=()
  arithmetic: Arithmetic


def prepare(curvature, damping, arithmetic: Arithmetic = ACCURATE) -> FactorsData:
  f = curvature.factors
  damping = jnp.asarray(damping, f.a.dtype)
  a, g = curvature_array(f.a, arithmetic), curvature_array(f.g, arithmetic)
  return FactorsData(a, g, damping, arithmetic)


def operator(data: FactorsData, v: jax.Array) -> jax.Array:
  ar = data.arithmetic
  return matmul(matmul(data.a, v, ar), data.g, ar) + data.damping * v


def diagonal(data: FactorsData) -> jax.Array:
  dtype = data.damping.dtype
  return jnp.outer(jnp.diag(data.a).astype(dtype), jnp.diag(data.g).astype(dtype)) + data.damping


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  n = float(shape.d_a) * shape.d_g
  return form_factors_flops(shape, data_shards) + (cg_iters + 1) * 2 * n * (shape.d_a + shape.d_g)


def memory(shape: LayerShape) -> int:
  return shape.d_a**2 + shape.d_g**2


def communication(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  """The factors are all-reduced once."""
  return 0.0 if data_shards <= 1 else float(shape.d_a**2 + shape.d_g**2)


CG_MATERIALIZED = Solver(
  name="cg_materialized",
  curvature="factors",
  refresh=None,
  prepare=prepare,
  operator=operator,
  preconditioner=None,
  diagonal=diagonal,
  solve=None,
  flops=flops,
  memory=memory,
  communication=communication,
  matrix_free=False,
  exact=True,
)
