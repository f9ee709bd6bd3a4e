r"""KL clipping: bound the Fisher norm of a step without another curvature product.

A step ``s = -lr x`` with ``x = (F + gamma I)^{-1} grad`` changes the model's
predictive distribution by about ``KL ~ 1/2 s^T F s``; kfac-pytorch's
``kl_clip`` and kfac-jax's ``norm_constraint`` bound it by scaling ``x`` by

.. math::

  c = \min\Big(1, \sqrt{\kappa \,/\, (\mathrm{lr}^2\, \textstyle\sum_\ell
      \langle x_\ell, \nabla_\ell \rangle)}\Big),

summed over the preconditioned layers. The sum uses what the solve already has:
``<x, grad> = <x, (F + gamma I) x>`` holds exactly for the direct solvers and
for CG started from zero (its iterates are Galerkin), and up to
``|<x, r>| <= ||x|| ||r||`` for a warm-started CG with residual ``r``. Since
``<x, F x> <= <x, (F + gamma I) x>``, the clipped step satisfies
``lr^2 <c x, F c x> <= kappa`` (up to that residual term).

The layers' ``x`` and ``grad`` come scaled by powers of two (see
:mod:`cgfac_optax._finite`), so the sum is kept as a mantissa and a power of
two, and the factor is returned the same way: it is exact for gradients near
``1e30`` where ``<x, grad>`` itself would overflow float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._finite import times_pow2


class ScaledSum(NamedTuple):
  """``mantissa * 2**exponent``, a non-negative number that may exceed the float range.

  Sums of ``<x, grad>`` over layers and the clipping factor itself are kept this way.
  """

  mantissa: jax.Array  # shape=(), float
  exponent: jax.Array  # shape=(), int32

  def value(self) -> jax.Array:
    """The number itself (``inf`` or 0 where it leaves the float range)."""
    return times_pow2(self.mantissa, self.exponent)


def scaled_sum(terms: Sequence[jax.Array], exponents: Sequence[jax.Array]) -> ScaledSum:
  """``sum_l max(terms[l], 0) * 2**exponents[l]`` without overflow or underflow of the terms."""
  terms = jnp.stack([jnp.maximum(t, 0) for t in terms])
  exponents = jnp.stack([jnp.asarray(e, jnp.int32) for e in exponents])
  top = jnp.max(jnp.where(terms > 0, exponents, jnp.iinfo(jnp.int32).min))
  top = jnp.where(jnp.any(terms > 0), top, 0)
  return ScaledSum(jnp.sum(times_pow2(terms, exponents - top)), top)


def x_dot_grad(x_hats, b_hats, exponents) -> ScaledSum:
  """``sum_l <x_l, grad_l>`` for ``x_l = x_hat_l 2^e_l`` and ``grad_l = b_hat_l 2^e_l``."""
  return scaled_sum([jnp.sum(x * b) for x, b in zip(x_hats, b_hats)], [2 * e for e in exponents])


def kl_clip_factor(xg: ScaledSum, learning_rate, bound) -> ScaledSum:
  """``c = min(1, sqrt(bound / (lr^2 <x, grad>)))``, as a mantissa and a power of two.

  ``<x, grad> = 0`` (a zero gradient) gives ``c = 1``. The exponent of the sum
  is even (twice each layer's), so its square root is an exact power of two.
  """
  dtype = xg.mantissa.dtype
  lr = jnp.abs(jnp.asarray(learning_rate, dtype))
  mantissa = jnp.sqrt(jnp.asarray(bound, dtype)) / (lr * jnp.sqrt(xg.mantissa))
  exponent = -(xg.exponent // 2)
  # c < 1 exactly when log2(mantissa) + exponent < 0; inf (nothing to clip) compares as no clip.
  clip = jnp.log2(mantissa) + exponent.astype(dtype) < 0
  return ScaledSum(
    mantissa=jnp.where(clip, mantissa, jnp.ones([], dtype)),
    exponent=jnp.where(clip, exponent, 0).astype(jnp.int32),
  )


def no_clip(dtype) -> ScaledSum:
  """The factor 1."""
  return ScaledSum(jnp.ones([], dtype), jnp.zeros([], jnp.int32))
