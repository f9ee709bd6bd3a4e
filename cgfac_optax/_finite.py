"""Guards that keep one bad batch from poisoning a solve or the optimizer state.

A layer's system ``(F + gamma I) x = b`` is solved on a *unit* right-hand side:
``b`` is divided by the power of two ``2^e`` nearest above ``max |b|`` (exact in
floating point), and the solution is multiplied back. CG's squared norms then
neither overflow for gradients near ``1e30`` nor underflow to a "zero
right-hand side" for gradients near ``1e-25``, and every solver gives the same
answer as on the unscaled system, bit for bit when nothing over- or underflows.

A layer whose gradient or stats hold a NaN or an infinity is *skipped*: its
system is replaced by ``0 x = 0`` (so nothing non-finite enters any product or
solve), its update is zero, and its warm start is reset to zero. The same
happens when a solve of finite inputs still returns non-finite values, or when
the update does not fit the parameter dtype (e.g. above 65504 in float16).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class UnitSystem(NamedTuple):
  """One layer's system with its right-hand side scaled to ``max |b| in [1/2, 1)``.

  The solution of the original system is ``ldexp(x_hat, exponent)`` where
  ``x_hat`` solves the scaled one from ``x0``.
  """

  a: jax.Array  # rows x d_A, zeros when skipped
  g: jax.Array  # rows x d_G, zeros when skipped
  b: jax.Array  # d_A x d_G, the scaled right-hand side, zeros when skipped
  x0: jax.Array  # d_A x d_G, the scaled warm start, zeros when unusable
  exponent: jax.Array  # shape=(), dtype=int32
  ok: jax.Array  # shape=(), dtype=bool: inputs finite


def all_finite(*xs: jax.Array) -> jax.Array:
  """Whether every entry of every array is finite, as a scalar bool."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]).all()


def unit_system(a: jax.Array, g: jax.Array, b: jax.Array, x0: jax.Array) -> UnitSystem:
  """Checks a layer's inputs and scales its right-hand side by an exact power of two."""
  ok = all_finite(a, g, b)
  _, exponent = jnp.frexp(jnp.max(jnp.abs(b), initial=0.0))
  exponent = jnp.where(ok, exponent, 0).astype(jnp.int32)
  b_hat = jnp.where(ok, jnp.ldexp(b, -exponent), 0)
  x0_hat = jnp.ldexp(x0, -exponent)
  # A warm start that no longer fits the scale (or was never finite) is dropped, not clipped.
  x0_hat = jnp.where(ok & all_finite(x0_hat), x0_hat, 0)
  return UnitSystem(
    a=jnp.where(ok, a, 0),
    g=jnp.where(ok, g, 0),
    b=b_hat,
    x0=x0_hat,
    exponent=exponent,
    ok=ok,
  )


def cast_or_zero(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """``x`` in ``dtype`` if every entry stays finite there, else zeros; and whether it did."""
  y = x.astype(dtype)
  finite = all_finite(y)
  return jnp.where(finite, y, jnp.zeros_like(y)), finite
