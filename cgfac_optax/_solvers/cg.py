r"""``"cg"``: conjugate gradient with the matrix-free product (the CG-FAC paper's).

The product never forms ``A``, ``G`` or the Fisher: with the curvature rows
``a`` (``B x d_A``) and ``g`` (``B x d_G``),

.. math::

  A V G = s_A s_G\, a^\top \big((a V) g^\top\big) g ,

``4 B d_A d_G + 4 B^2 \min(d_A, d_G)`` flops and ``B (d_A + d_G) + B^2``
elements: the ``B x B`` middle matrix is taken through the narrower side (a
static choice from shapes), which matters for lopsided layers such as a
vocabulary projection. Its ground: wide layers whose factors do not fit in
memory, with many rows. With a 16-bit curvature dtype the rows are held in it
and every product rounds its other operand to it, accumulating in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import CurvatureRows, LayerShape
from cgfac_optax._solvers._base import (
  ACCURATE,
  Arithmetic,
  Solver,
  curvature_array,
  matmul,
  matmul_t,
  solve_dtype,
)


class RowsData(NamedTuple):
  rows: CurvatureRows
  scale: jax.Array  # shape=(): s_A s_G
  damping: jax.Array  # shape=()
  arithmetic: Arithmetic


def prepare(rows: CurvatureRows, damping, arithmetic: Arithmetic = ACCURATE) -> RowsData:
  dtype = solve_dtype(rows.a)
  scale = jnp.asarray(rows.scale_a * rows.scale_g, dtype)
  a, g = curvature_array(rows.a, arithmetic), curvature_array(rows.g, arithmetic)
  return RowsData(rows._replace(a=a, g=g), scale, jnp.asarray(damping, dtype), arithmetic)


def kronecker_product(data: RowsData, v: jax.Array) -> jax.Array:
  """``A V G`` from the rows alone."""
  a, g, ar = data.rows.a, data.rows.g, data.arithmetic
  if a.shape[1] <= g.shape[1]:
    k = matmul(a, matmul_t(v, g, ar), ar)  # rows x rows, via d_A x rows
    return data.scale * matmul(matmul(a.T, k, ar), g, ar)
  k = matmul_t(matmul(a, v, ar), g, ar)  # rows x rows, via rows x d_G
  return data.scale * matmul(a.T, matmul(k, g, ar), ar)


def operator(data: RowsData, v: jax.Array) -> jax.Array:
  return kronecker_product(data, v) + data.damping * v


def diagonal(data: RowsData) -> jax.Array:
  """``diag(A (x) G) + damping = outer(s_A sum(a^2), s_G sum(g^2)) + damping``."""
  r, dtype = data.rows, data.damping.dtype
  sq = lambda x: jnp.sum(jnp.square(x.astype(dtype)), axis=0)
  return jnp.outer(r.scale_a * sq(r.a), r.scale_g * sq(r.g)) + data.damping


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  b, n = float(shape.rows), float(shape.d_a) * shape.d_g
  product = 4 * b * n + 4 * b * b * min(shape.d_a, shape.d_g)
  return (cg_iters + 1) * product / data_shards


def memory(shape: LayerShape) -> int:
  return shape.rows * (shape.d_a + shape.d_g) + shape.rows**2


def communication(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  """Each product all-reduces its ``d_A x d_G`` result and exchanges the middle's narrow side.

  (``g``'s rows gathered, or ``V g^T`` gathered and ``a^T k`` reduced when ``d_A <= d_G``.)
  """
  if data_shards <= 1:
    return 0.0
  b, d_a, d_g = float(shape.rows), shape.d_a, shape.d_g
  middle = 2 * b * d_a if d_a <= d_g else b * d_g
  return (cg_iters + 1) * (d_a * d_g + middle)


CG = Solver(
  name="cg",
  curvature="rows",
  refresh=None,
  prepare=prepare,
  operator=operator,
  preconditioner=None,
  diagonal=diagonal,
  solve=None,
  flops=flops,
  memory=memory,
  communication=communication,
  matrix_free=True,
  exact=True,
)
