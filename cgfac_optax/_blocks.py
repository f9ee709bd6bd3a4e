"""Per-layer curvature blocks: Kronecker-factored products, diagonals and solves.

Every function here is a pure array function of one layer's curvature rows.
For a layer whose per-row inputs are ``a`` (``rows x d_A``) and per-row output
gradients are ``g`` (``rows x d_G``), the K-FAC block is

.. math::

  F = A \\otimes G, \\quad A = s_A\\, a^\\top a, \\quad G = s_G\\, g^\\top g,

acting on a ``d_A x d_G`` matrix ``V`` as ``V -> A V G``. The scales follow one
rule for every layer kind: with ``examples`` leading examples spread over
``rows`` rows (one row per example for an MLP, one per token for a sequence,
one per output position for a convolution), ``s_A = 1 / rows`` and
``s_G = 1 / examples``. For an MLP both are ``1 / B``; for a layer applied at
``T`` positions this is the K-FAC "expand" / KFC convention (Eschenhagen et al.
2023; Grosse & Martens 2016), which is also what kfac-jax uses for repeated
dense layers.

Solvers come in two kinds. *Iterative* ones give ``prepare(a, g, s_A, s_G)``
and ``matvec(data, V) = F V`` for conjugate gradient; *direct* ones give
``prepare`` and ``solve(data, V, damping) = (F + damping I)^{-1} V``. The table
:data:`SOLVERS` maps a solver name to its functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class DenseStats(NamedTuple):
  """The curvature statistics of one layer for one batch.

  Attributes:
    inputs: the layer inputs ``a``, shape ``(examples, ..., d_in)``, without the
      homogeneous coordinate (a column of ones is appended when the layer has a
      bias).
    output_grads: the gradients of the *per-example* loss with respect to the
      layer outputs ``g``, shape ``(examples, ..., d_out)``. If the training
      loss is a batch mean, these are ``examples`` times the gradient a
      backward pass of the mean loss gives.
  """

  inputs: jax.Array
  output_grads: jax.Array


def to_rows(x: jax.Array) -> jax.Array:
  """Flattens ``(..., d)`` to ``(rows, d)``."""
  return x.reshape(-1, x.shape[-1])


def append_ones(a: jax.Array) -> jax.Array:
  """Appends the homogeneous coordinate (a column of ones) to ``(rows, d)``."""
  return jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)


def factor_scales(stats: DenseStats) -> tuple[float, float]:
  """Static scales ``(s_A, s_G)`` of ``A`` and ``G`` from the stats' shapes."""
  examples = stats.inputs.shape[0]
  rows = 1
  for n in stats.inputs.shape[:-1]:
    rows *= n
  return 1.0 / rows, 1.0 / examples


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


# Matrix-free product (the paper's FV): nothing of size d_A^2 or d_G^2.


def rows_prepare(a, g, scale_a, scale_g):
  """Curvature data of the matrix-free product: the rows themselves."""
  return a, g, jnp.asarray(scale_a * scale_g, a.dtype)


def rows_matvec(data, v: jax.Array) -> jax.Array:
  """``A V G`` as ``s a^T ((a V) g^T) g``: about ``4 rows d_A d_G + 2 rows^2 (d_A + d_G)`` flops."""
  a, g, scale = data
  av = _dot(a, v)  # rows x d_G
  k = _dot(av, g.T)  # rows x rows
  return scale * _dot(a.T, _dot(k, g))


# Materialized factors: A and G formed once per step, then matmul-only products.


def factors(a, g, scale_a, scale_g) -> tuple[jax.Array, jax.Array]:
  """The factors ``A = s_A a^T a`` and ``G = s_G g^T g``."""
  return scale_a * _dot(a.T, a), scale_g * _dot(g.T, g)


def factors_matvec(data, v: jax.Array) -> jax.Array:
  """``A V G`` from materialized factors: ``2 d_A d_G (d_A + d_G)`` flops."""
  fa, fg = data
  return _dot(_dot(fa, v), fg)


# Direct solves.


class EigenFactors(NamedTuple):
  """Thin or full eigendecompositions ``A = Q_A diag(l_A) Q_A^T`` (and for G)."""

  q_a: jax.Array  # d_A x k_A
  l_a: jax.Array  # k_A
  q_g: jax.Array  # d_G x k_G
  l_g: jax.Array  # k_G


def eigh_prepare(a, g, scale_a, scale_g) -> EigenFactors:
  """Eigendecomposition of the materialized factors (standard K-FAC)."""
  fa, fg = factors(a, g, scale_a, scale_g)
  l_a, q_a = jnp.linalg.eigh(fa)
  l_g, q_g = jnp.linalg.eigh(fg)
  return EigenFactors(q_a, jnp.maximum(l_a, 0), q_g, jnp.maximum(l_g, 0))


def eigh_solve(data: EigenFactors, v: jax.Array, damping) -> jax.Array:
  """``(A (x) G + damping I)^{-1} V`` with exact damping, from full eigenbases."""
  c = _dot(_dot(data.q_a.T, v), data.q_g)
  c = c / (jnp.outer(data.l_a, data.l_g) + damping)
  return _dot(_dot(data.q_a, c), data.q_g.T)


def _thin_eigenbasis(x: jax.Array, scale) -> tuple[jax.Array, jax.Array]:
  """Orthonormal eigenvectors of ``scale x^T x`` from the ``rows x rows`` Gram.

  With ``x x^T = U diag(s) U^T``, the columns of ``x^T U diag(s)^{-1/2}`` are
  orthonormal eigenvectors of ``x^T x`` with eigenvalues ``s``. Directions whose
  eigenvalue is at rounding level are dropped (their column is set to zero),
  so rank-deficient rows never divide by zero.
  """
  s, u = jnp.linalg.eigh(_dot(x, x.T))
  eps = jnp.finfo(x.dtype).eps
  keep = s > eps * x.shape[0] * jnp.max(jnp.abs(s), initial=0.0)
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, s, 1.0)), 0.0)
  basis = _dot(x.T, u * inv_sqrt)
  return basis, jnp.where(keep, s, 0.0) * scale


def lowrank_prepare(a, g, scale_a, scale_g) -> EigenFactors:
  """Thin eigendecompositions of ``A`` and ``G`` without forming either."""
  q_a, l_a = _thin_eigenbasis(a, scale_a)
  q_g, l_g = _thin_eigenbasis(g, scale_g)
  return EigenFactors(q_a, l_a, q_g, l_g)


def lowrank_solve(data: EigenFactors, v: jax.Array, damping) -> jax.Array:
  """Exact solve with thin eigenbases (DESIGN: ``X = V/g + W_A (C/(l l^T + g) - C/g) W_G^T``).

  Evaluated as ``W_A (C/(l l^T + g)) W_G^T + (V - P V)/g`` with ``P`` the
  projection on the bases' span applied twice: forming ``V/g`` and
  ``W C W^T/g`` separately would cancel catastrophically for a tiny damping
  (an error of ``eps ||V|| / g`` inside the span).
  """

  def project(x):
    return _dot(_dot(data.q_a, _dot(_dot(data.q_a.T, x), data.q_g)), data.q_g.T)

  c = _dot(_dot(data.q_a.T, v), data.q_g)
  rest = v - _dot(_dot(data.q_a, c), data.q_g.T)
  rest = rest - project(rest)
  inside = c / (jnp.outer(data.l_a, data.l_g) + damping)
  return _dot(_dot(data.q_a, inside), data.q_g.T) + rest / damping


def jacobi_diagonal(a: jax.Array, g: jax.Array, scale_a, scale_g) -> jax.Array:
  """``diag(A (x) G)`` as a ``d_A x d_G`` matrix: ``outer(s_A sum(a^2), s_G sum(g^2))``."""
  return jnp.outer(scale_a * jnp.sum(a * a, axis=0), scale_g * jnp.sum(g * g, axis=0))


class Solver(NamedTuple):
  """How one solver prepares its curvature data and applies it.

  ``apply`` is ``matvec(data, V) -> F V`` when ``iterative``, else
  ``solve(data, V, damping) -> (F + damping I)^{-1} V``.
  """

  iterative: bool
  prepare: Callable[..., Any]
  apply: Callable[..., jax.Array]


SOLVERS: dict[str, Solver] = {
  "cg": Solver(True, rows_prepare, rows_matvec),
  "cg_materialized": Solver(True, factors, factors_matvec),
  "eigh": Solver(False, eigh_prepare, eigh_solve),
  "lowrank": Solver(False, lowrank_prepare, lowrank_solve),
}
