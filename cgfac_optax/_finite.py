"""Guards that keep one bad batch from poisoning a solve or the optimizer state.

A layer's system ``(F + gamma I) x = b`` is solved on a *unit* right-hand side:
``b`` is divided by the power of two ``2^e`` nearest above ``max |b|`` (exact in
floating point), and the solution is multiplied back. CG's squared norms then
neither overflow for gradients near ``1e30`` nor underflow to a "zero
right-hand side" for gradients near ``1e-25``, and every solver gives the same
answer as on the unscaled system, bit for bit when nothing over- or underflows.

A layer whose gradient or stats hold a NaN or an infinity is *skipped*: its
right-hand side and warm start are set to zero (so CG counts it converged from
the start: with ``cg_skip="cond"`` its operator is never applied, with
``"mask"`` its products are computed and discarded), whatever a direct solver
returns for it is
discarded, its update is zero and its warm start is reset to zero. The same
happens when a solve of finite inputs still returns non-finite values, or when
the update does not fit the parameter dtype (e.g. above 65504 in float16).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class UnitSystem(NamedTuple):
  """One layer's right-hand side scaled to ``max |b| in [1/2, 1)``, and its warm start.

  The solution of the original system is ``times_pow2(x_hat, exponent)`` where
  ``x_hat`` solves the scaled one from ``x0``.
  """

  b: jax.Array  # d_A x d_G, the scaled right-hand side, zeros when skipped
  x0: jax.Array  # d_A x d_G, the scaled warm start, zeros when unusable
  exponent: jax.Array  # shape=(), dtype=int32
  ok: jax.Array  # shape=(), dtype=bool: inputs finite


def all_finite(*xs: jax.Array) -> jax.Array:
  """Whether every entry of every array is finite, as a scalar bool."""
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]).all()


def pow2(exponent, dtype) -> jax.Array:
  """``2**exponent`` in ``dtype`` (float32 or float64), exact, built from its bits.

  ``exponent`` (integers, any shape) is clipped to the normal range of ``dtype``.
  """
  info = jnp.finfo(dtype)
  wide = jnp.dtype(dtype).itemsize == 8
  e = jnp.clip(jnp.asarray(exponent), info.minexp, info.maxexp - 1)
  e = e.astype(jnp.int64 if wide else jnp.int32)
  return jax.lax.bitcast_convert_type((e + (info.maxexp - 1)) << info.nmant, dtype)


def times_pow2(x: jax.Array, exponent) -> jax.Array:
  """``x * 2**exponent``: exact unless the result over- or underflows.

  Three factors, each a normal number (for ``|exponent|`` up to three times the
  largest normal exponent: 378 in float32), made from their bits: three
  multiplications per entry. ``exponent`` broadcasts against ``x``.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  info = jnp.finfo(dtype)
  e = jnp.clip(jnp.asarray(exponent, jnp.int32), 3 * info.minexp, 3 * (info.maxexp - 1))
  e1 = e // 3
  e2 = (e - e1) // 2
  return x.astype(dtype) * pow2(e1, dtype) * pow2(e2, dtype) * pow2(e - e1 - e2, dtype)


def exponent_of(top: jax.Array) -> jax.Array:
  """``e`` with ``top = m 2^e``, ``m`` in ``[1/2, 1)``, for a finite ``top >= 0`` (0 for 0).

  As ``jnp.frexp`` gives it, read from the bits (arithmetic on subnormals may flush them
  to zero, so a subnormal's exponent is read from its leading mantissa bit).
  """
  dtype = jnp.promote_types(top.dtype, jnp.float32)
  info = jnp.finfo(dtype)
  width = 64 if jnp.dtype(dtype).itemsize == 8 else 32
  bits = jax.lax.bitcast_convert_type(top.astype(dtype), jnp.int64 if width == 64 else jnp.int32)
  field = (bits >> info.nmant) & (2**info.nexp - 1)
  bias = info.maxexp - 2  # frexp's exponent of a normal number is field - bias
  mantissa = bits & (2**info.nmant - 1)
  leading = (width - 1) - jax.lax.clz(mantissa)  # a subnormal is mantissa 2^-(nmant + bias)
  e = jnp.where(field > 0, field - bias, leading + 1 - info.nmant - bias)
  return jnp.where(bits != 0, e, 0).astype(jnp.int32)


def unit_system(curvature_ok: jax.Array, b: jax.Array, x0: jax.Array) -> UnitSystem:
  """Checks a layer's right-hand side and scales it by an exact power of two.

  ``curvature_ok``: whether the layer's curvature (the stats read this step, its memory)
  is finite; a layer whose curvature or right-hand side is not is skipped.
  """
  top = jnp.max(jnp.abs(b), initial=0.0)  # NaN if b holds one
  ok = jnp.isfinite(top) & curvature_ok
  exponent = exponent_of(jnp.where(ok, top, 0))
  b_hat = jnp.where(ok, times_pow2(b, -exponent), 0)
  x0_hat = times_pow2(x0, -exponent)
  # A warm start that no longer fits the scale (or was never finite) is dropped, not clipped.
  x0_hat = jnp.where(ok & all_finite(x0_hat), x0_hat, 0)
  return UnitSystem(b=b_hat, x0=x0_hat, exponent=exponent, ok=ok)


def zero_unless_finite(leaves: dict[int, jax.Array]) -> tuple[dict[int, jax.Array], jax.Array]:
  """The leaves if every entry of all of them is finite, else zeros; and whether they were."""
  finite = all_finite(*leaves.values())
  return {i: jnp.where(finite, x, jnp.zeros_like(x)) for i, x in leaves.items()}, finite
