r"""``"sketch"``: K-FAC's factored-damping solve on low-rank sketches of the averaged factors.

Curvature memory without anything of size ``d^2``: each factor's running
average (the rule of :mod:`cgfac_optax._memory`) is kept as a rank-``k`` sketch
with an isotropic tail,

.. math::

  \hat A = Q \operatorname{diag}(l)\, Q^\top + \sigma\, (I - Q Q^\top), \qquad
  \sigma = \frac{\max(\tau - \textstyle\sum_i l_i,\ 0)}{d - k},

``Q`` (``d x k``) orthonormal columns, ``l`` the average's ``k`` largest
eigenvalues as far as the sketch sees them, and ``tau`` the average's trace,
kept exactly (``tau_t = beta tau_{t-1} + (1 - beta) tr(A_t)``). The tail spreads
what the sketch does not hold evenly over the other ``d - k`` directions, so
that they keep a curvature of the right total size instead of being left to
the damping alone. With ``k >= d`` the sketch is the average itself and the
tail is zero.

**Update.** With the step's decay ``beta`` and rows ``a`` (``A_t = s a^T a``),
the columns of ``Y = [sqrt(beta) Q diag(sqrt(l)), sqrt((1 - beta) s) a^T]``
give ``Y Y^T = beta Q diag(l) Q^T + (1 - beta) A_t``, the average but for its
old tail. Its ``k`` largest eigenpairs come from the ``(k + r) x (k + r)`` Gram
``Y^T Y`` (``Q = Y U diag(e)^{-1/2}``, as ``"lowrank"`` does for one batch), or
from ``Y Y^T`` itself when ``d < k + r``: ``2 d (k + r)^2 + 9 (k + r)^3 + 2 d k (k + r)``
flops per factor and step, the last term for ``Q`` (``2 d^2 (k + r) + 9 d^3`` through
``Y Y^T``). What the truncation drops, and the old tail, stay in ``tau`` and so in the
new tail.

**Solve.** Factored damping, as ``"kfac_inverse"`` (Martens & Grosse 2015,
sec. 6.3): ``x = (\hat A + \pi \sqrt\gamma I)^{-1} V (\hat G + \sqrt\gamma/\pi
I)^{-1}`` with ``pi = sqrt((tau_A / d_A) / (tau_G / d_G))``, where each inverse
is explicit,

.. math::

  (\hat A + \delta I)^{-1} = Q \operatorname{diag}\Big(\frac{1}{l + \delta}\Big) Q^\top
    + \frac{I - Q Q^\top}{\sigma + \delta},

so the solve is four thin products, ``8 k d_A d_G`` flops, with the current
damping and no decomposition or inverse on the refresh schedule. Memory
``(k + 1) (d_A + d_G)`` per layer, against ``2 (d_A^2 + d_G^2)`` for the
materialized solvers; for a ``1000 x 1000`` layer at ``k = 64`` the solve costs
about a fifteenth of ``"kfac_inverse"``'s two ``d^3`` products. The cost model
of :func:`cgfac_optax.plan` counts ``k`` as :data:`DEFAULT_RANK` (it has no
rank option); the solver is not exact and ``"auto"`` never picks it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import CurvatureRows, LayerShape
from cgfac_optax._solvers._base import ACCURATE, Arithmetic, Solver, matmul
from cgfac_optax._solvers.pcg import factored_shifts

DEFAULT_RANK = 64


class Sketch(NamedTuple):
  """One factor's running average as ``Q diag(l) Q^T + sigma (I - Q Q^T)`` (module docstring)."""

  q: jax.Array  # d x k, orthonormal columns; a zero column for a direction not (yet) held
  values: jax.Array  # k, eigenvalues on those columns (zero for a zero column)
  trace: jax.Array  # shape=(), the running average's trace


class SketchMemory(NamedTuple):
  """A layer's two sketches."""

  a: Sketch
  g: Sketch


class SketchData(NamedTuple):
  """The sketches and the factored damping of one step."""

  a: Sketch
  g: Sketch
  shift_a: jax.Array  # shape=(), pi sqrt(gamma)
  shift_g: jax.Array  # shape=(), sqrt(gamma) / pi
  arithmetic: Arithmetic


def empty(d: int, rank: int, dtype) -> Sketch:
  """A zero sketch of width ``d`` holding ``min(rank, d)`` directions."""
  k = min(rank, d)
  return Sketch(jnp.zeros((d, k), dtype), jnp.zeros((k,), dtype), jnp.zeros([], dtype))


def init(d_a: int, d_g: int, rank: int, dtype) -> SketchMemory:
  return SketchMemory(empty(d_a, rank, dtype), empty(d_g, rank, dtype))


def tail(s: Sketch) -> jax.Array:
  """``sigma``: what the trace holds beyond the kept eigenvalues, per remaining direction."""
  d, k = s.q.shape
  if d == k:
    return jnp.zeros([], s.values.dtype)
  return jnp.maximum(s.trace - jnp.sum(s.values), 0.0) / (d - k)


def update(s: Sketch, x: jax.Array, scale, beta, arithmetic: Arithmetic = ACCURATE) -> Sketch:
  """The sketch of ``beta * (average) + (1 - beta) * scale * x^T x`` (module docstring)."""
  d, k = s.q.shape
  dtype = s.q.dtype
  beta = jnp.asarray(beta, dtype)
  x = x.astype(dtype)
  rows = x.shape[0]
  old = s.q * jnp.sqrt(beta * s.values)  # d x k
  new = jnp.sqrt((1 - beta) * jnp.asarray(scale, dtype)) * x  # rows x d
  eps = jnp.finfo(dtype).eps
  if k + rows <= d:
    y = jnp.concatenate([old, new.T], axis=1)  # d x (k + rows)
    e, u = jnp.linalg.eigh(matmul(y.T, y, arithmetic))
    e, u = e[-k:], u[:, -k:]
    keep = e > eps * (k + rows) * jnp.max(jnp.abs(e), initial=0.0)
    q = matmul(y, u * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, e, 1.0)), 0.0), arithmetic)
  else:
    e, q = jnp.linalg.eigh(matmul(old, old.T, arithmetic) + matmul(new.T, new, arithmetic))
    e, q = e[-k:], q[:, -k:]
    keep = e > eps * d * jnp.max(jnp.abs(e), initial=0.0)
    q = jnp.where(keep, q, 0.0)
  trace = beta * s.trace + (1 - beta) * jnp.asarray(scale, dtype) * jnp.sum(jnp.square(x))
  # A non-finite eigenvalue (rows that overflow) stays in the sketch, so that the solve and the
  # memory show it and the layer is skipped, rather than dropped as a direction not held.
  return Sketch(q, jnp.where(keep | ~jnp.isfinite(e), e, 0.0), trace)


def update_memory(
  memory: SketchMemory, rows: CurvatureRows, beta, arithmetic: Arithmetic = ACCURATE
) -> SketchMemory:
  """Both sketches after this step's rows, with the decay ``beta`` of this step."""
  return SketchMemory(
    update(memory.a, rows.a, rows.scale_a, beta, arithmetic),
    update(memory.g, rows.g, rows.scale_g, beta, arithmetic),
  )


def dense(s: Sketch) -> jax.Array:
  """``Q diag(l) Q^T + sigma (I - Q Q^T)`` as a ``d x d`` matrix (for tests and inspection)."""
  d = s.q.shape[0]
  sigma = tail(s)
  return (s.q * (s.values - sigma)) @ s.q.T + sigma * jnp.eye(d, dtype=s.q.dtype)


def prepare(memory: SketchMemory, damping, arithmetic: Arithmetic = ACCURATE) -> SketchData:
  ta = memory.a.trace / memory.a.q.shape[0]
  tg = memory.g.trace / memory.g.q.shape[0]
  shifts = factored_shifts(ta, tg, damping, memory.a.q.dtype)
  return SketchData(memory.a, memory.g, *shifts, arithmetic)


def _inverse_coefficients(s: Sketch, shift) -> tuple[jax.Array, jax.Array]:
  """``(1 / (l + delta) - 1 / (sigma + delta), 1 / (sigma + delta))``."""
  off = 1.0 / (tail(s) + shift)
  return 1.0 / (s.values + shift) - off, off


def solve(data: SketchData, v: jax.Array) -> jax.Array:
  span_a, off_a = _inverse_coefficients(data.a, data.shift_a)
  span_g, off_g = _inverse_coefficients(data.g, data.shift_g)
  ar = data.arithmetic
  left = off_a * v + matmul(data.a.q * span_a, matmul(data.a.q.T, v, ar), ar)
  return off_g * left + matmul(matmul(left, data.g.q, ar), (data.g.q * span_g).T, ar)


def _sketch_flops(d: int, rows: int, k: int) -> float:
  """One factor's update: through the Gram of ``Y`` (and ``Q = Y U``), or ``Y Y^T`` itself."""
  k, m = min(k, d), min(k, d) + rows
  if m <= d:
    return 2.0 * d * m * m + 9.0 * m**3 + 2.0 * d * m * k
  return 2.0 * d * d * m + 9.0 * d**3


def flops(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  k_a, k_g = min(DEFAULT_RANK, shape.d_a), min(DEFAULT_RANK, shape.d_g)
  update_cost = _sketch_flops(shape.d_a, shape.rows, k_a) + _sketch_flops(
    shape.d_g, shape.rows, k_g
  )
  return update_cost + 4.0 * (k_a + k_g) * shape.d_a * shape.d_g


def memory(shape: LayerShape) -> int:
  k_a, k_g = min(DEFAULT_RANK, shape.d_a), min(DEFAULT_RANK, shape.d_g)
  return (k_a + 1) * shape.d_a + (k_g + 1) * shape.d_g


def _sketch_communication(d: int, rows: int, k: int, data_shards: int) -> float:
  """One factor's update with the rows sharded.

  Through the Gram: the rows are gathered, the ``(k + rows)^2`` Gram too (after an all-to-all
  of its blocks) and ``Q = Y U`` all-reduced; through ``Y Y^T``: it is all-reduced, as a
  formed factor. And the trace, one scalar.
  """
  k, m = min(k, d), min(k, d) + rows
  if m <= d:
    return float(rows * d + m * m + m * m / data_shards + d * k + 1)
  return float(d * d + 1)


def communication(shape: LayerShape, cg_iters: int, data_shards: int) -> float:
  """Exchanged by the two sketch updates; the solve works on replicated data."""
  if data_shards <= 1:
    return 0.0
  k_a, k_g = min(DEFAULT_RANK, shape.d_a), min(DEFAULT_RANK, shape.d_g)
  return _sketch_communication(shape.d_a, shape.rows, k_a, data_shards) + _sketch_communication(
    shape.d_g, shape.rows, k_g, data_shards
  )


SKETCH = Solver(
  name="sketch",
  curvature="sketch",
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
  exact=False,
)
