r"""Curvature with memory: running averages of the Kronecker factors, and their eigenbases.

One batch's factors ``A_t = s_A a^T a`` and ``G_t = s_G g^T g`` come from a few
hundred rows at most, so for a layer wider than that they are rank-deficient
and every other direction is left to the damping. K-FAC keeps an exponential
moving average of each factor instead,

.. math::

  \bar A_t = \beta_t \bar A_{t-1} + (1 - \beta_t) A_t, \qquad
  \beta_t = \min\big(\beta, \tfrac{t}{t + 1}\big),

(likewise ``G``) where ``t`` counts the steps from 0: the first step takes the
batch factors as they are and the early average is the plain mean of the
factors seen so far, with no bias toward the zero start. The averages live in
the optimizer state as ``d_A x d_A`` and ``d_G x d_G`` arrays, so memory costs
``d_A^2 + d_G^2`` per layer; ``decay = 0`` is the batch-only curvature.

The solvers that use an eigendecomposition of the factors (``"eigh"``,
``"pcg"``) keep one in the state too, refreshed on a schedule: on steps
``0, 1, 2, 4, 8, ...`` below ``refresh_every``, then every ``refresh_every``
steps (a ``lax.cond``, so the other steps do no eigendecomposition). Between
refreshes ``"eigh"`` solves with the stale basis (standard K-FAC's amortized
inverse), while ``"pcg"`` runs CG on the current averages and uses the stale
basis only as its preconditioner.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._solvers._base import EigenFactors, factors


class Factors(NamedTuple):
  """A layer's Kronecker factors."""

  a: jax.Array  # d_A x d_A
  g: jax.Array  # d_G x d_G


class Eigenbasis(NamedTuple):
  """``A = q_a diag(l_a) q_a^T`` and ``G = q_g diag(l_g) q_g^T``."""

  q_a: jax.Array  # d_A x d_A
  l_a: jax.Array  # d_A
  q_g: jax.Array  # d_G x d_G
  l_g: jax.Array  # d_G


class LayerMemory(NamedTuple):
  """What a layer keeps between steps: the averaged factors and an eigenbasis of them."""

  factors: Factors
  basis: Eigenbasis | None  # None for solvers that use none


class FactorCurvature(NamedTuple):
  """The curvature a factor-based solver prepares from."""

  factors: Factors
  basis: Eigenbasis | None


def init_layer(d_a: int, d_g: int, dtype, with_basis: bool) -> LayerMemory:
  """Zero factors, and an identity basis with zero eigenvalues (replaced at step 0)."""
  basis = None
  if with_basis:
    basis = Eigenbasis(
      jnp.eye(d_a, dtype=dtype),
      jnp.zeros(d_a, dtype),
      jnp.eye(d_g, dtype=dtype),
      jnp.zeros(d_g, dtype),
    )
  return LayerMemory(Factors(jnp.zeros((d_a, d_a), dtype), jnp.zeros((d_g, d_g), dtype)), basis)


def batch_factors(rows) -> Factors:
  return Factors(*factors(rows))


def batch_curvature(solver, rows):
  """What ``solver.prepare`` takes, from this batch's rows alone (no memory)."""
  if solver.curvature == "rows":
    return rows
  f = batch_factors(rows)
  return FactorCurvature(f, eigenbasis(f) if solver.uses_basis else None)


def average(previous: Factors, batch: Factors, decay, count: jax.Array) -> Factors:
  """The running average after this step's factors (the rule in the module docstring)."""
  t = count.astype(batch.a.dtype)
  beta = jnp.minimum(jnp.asarray(decay, batch.a.dtype), t / (t + 1))
  return Factors(*(beta * p + (1 - beta) * b for p, b in zip(previous, batch)))


def eigenbasis(f: Factors) -> Eigenbasis:
  """Eigendecompositions of both factors, eigenvalues clipped at 0 (they are PSD)."""
  l_a, q_a = jnp.linalg.eigh(f.a)
  l_g, q_g = jnp.linalg.eigh(f.g)
  return Eigenbasis(q_a, jnp.maximum(l_a, 0), q_g, jnp.maximum(l_g, 0))


def refresh_due(count: jax.Array, refresh_every: int) -> jax.Array:
  """Steps ``0, 1, 2, 4, ...`` below ``refresh_every``, then every ``refresh_every``-th."""
  power_of_two = (count & (count - 1)) == 0
  return jnp.where(count < refresh_every, power_of_two, count % refresh_every == 0)


def update(
  memory: LayerMemory, batch: Factors, decay, count: jax.Array, refresh_every: int
) -> LayerMemory:
  """Averages in the batch factors and refreshes the basis when due."""
  f = average(memory.factors, batch, decay, count)
  basis = memory.basis
  if basis is not None:
    if refresh_every == 1:
      basis = eigenbasis(f)
    else:
      basis = jax.lax.cond(refresh_due(count, refresh_every), eigenbasis, lambda _: basis, f)
  return LayerMemory(f, basis)


def with_damping(basis: Eigenbasis, damping) -> EigenFactors:
  """The basis as the direct solvers' :class:`EigenFactors`."""
  return EigenFactors(*basis, jnp.asarray(damping, basis.l_a.dtype))
