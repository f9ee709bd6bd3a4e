"""Conjugate gradient over many independent blocks in one ``lax.while_loop``.

The loop knows nothing about layers: it takes one positive-definite operator,
right-hand side and starting point per block, and runs (preconditioned) CG on
all blocks at once with per-block step sizes and a per-block convergence mask.
A block that has converged stops changing while the others finish.

How a converged block skips its work is a choice (``skip``):

- ``"mask"``: every block's preconditioner and operator run every iteration
  and a converged block's results are discarded by ``jnp.where``. The loop body
  has no conditional, so XLA can fuse and schedule all blocks' products
  together and, on a mesh, combine their collectives; on a GPU a conditional
  reads its predicate back to the host, once per block and iteration.
- ``"cond"``: each block's preconditioner and operator sit in a ``lax.cond``
  that skips them once the block has converged: no wasted flops, one
  conditional per block and iteration.

The default is per platform (:data:`DEFAULT_SKIP`): ``"cond"`` on CPU, where a
conditional costs nothing extra and a masked block's products are pure waste;
``"mask"`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Operator = Callable[[jax.Array], jax.Array]
Skip = Literal["mask", "cond"]
SKIPS: tuple[Skip, ...] = ("mask", "cond")
DEFAULT_SKIP: dict[str, Skip] = {"cpu": "cond"}  # any other platform: "mask"


def default_skip(platform: str) -> Skip:
  """What ``skip=None`` means on ``platform`` (``jax.default_backend()`` at trace time)."""
  return DEFAULT_SKIP.get(platform, "mask")


class CGResult(NamedTuple):
  """The solutions of a batched CG solve.

  Attributes:
    x: one solution per block.
    iterations: CG iterations each block took, shape ``(blocks,)``, int32.
    residual: each block's relative residual ``||b - A x|| / ||b||`` from the
      recurrence (0 for a zero right-hand side; NaN for non-finite input),
      shape ``(blocks,)``.
  """

  x: list[jax.Array]
  iterations: jax.Array
  residual: jax.Array


def _vdots(xs: Sequence[jax.Array], ys: Sequence[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.sum(x * y) for x, y in zip(xs, ys)])


def _apply_active(
  ops: Sequence[Operator | None], xs, active: jax.Array, skip: Skip, inactive=jnp.zeros_like
) -> list[jax.Array]:
  """``op(x)`` of each active block, ``inactive(x)`` of the others; ``x`` where ``op`` is None."""
  out = []
  for i, (op, x) in enumerate(zip(ops, xs)):
    if op is None:
      out.append(x)
    elif skip == "cond":
      # lax.cond skips the product of a converged block at run time.
      out.append(jax.lax.cond(active[i], op, inactive, x))
    else:
      out.append(jnp.where(active[i], op(x), inactive(x)))
  return out


def _iteration(carry, operators, precs, skip: Skip, threshold):
  """One CG iteration of every active block."""
  # The preconditioned residual is formed at the top of an iteration, not the bottom of the
  # last one: the last iteration's would never be used, and a preconditioner can cost as
  # much as the operator.
  x, r, p, rz_old, rr, active, iters, k = carry
  z = _apply_active(precs, r, active, skip, lambda r: r)
  rz = _vdots(r, z)
  first = iters == 0
  beta = jnp.where(first | (rz_old == 0), 0, rz / jnp.where(rz_old == 0, 1, rz_old))
  beta = [bi.astype(pi.dtype) for bi, pi in zip(beta, p)]
  p = [jnp.where(a, zi + bt * pi, pi) for a, zi, bt, pi in zip(active, z, beta, p)]
  ap = _apply_active(operators, p, active, skip)
  pap = _vdots(p, ap)
  ok = active & (pap > 0) & jnp.isfinite(pap) & jnp.isfinite(rz)
  alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1), 0)
  # The per-block scalars are stacked in the widest block dtype; each block keeps its own.
  alpha = [ai.astype(xi.dtype) for ai, xi in zip(alpha, x)]
  x = [jnp.where(o, xi + a * pi, xi) for o, xi, a, pi in zip(ok, x, alpha, p)]
  r = [jnp.where(o, ri - a * api, ri) for o, ri, a, api in zip(ok, r, alpha, ap)]
  rr = jnp.where(ok, _vdots(r, r), rr)
  rz_old = jnp.where(ok, rz, rz_old)
  iters = iters + ok.astype(jnp.int32)
  active = ok & (rr > threshold)
  return x, r, p, rz_old, rr, active, iters, k + 1


def batched_cg(
  operators: Sequence[Operator],
  b: Sequence[jax.Array],
  x0: Sequence[jax.Array] | None,
  *,
  max_iters: int | jax.Array,
  tol: float | jax.Array,
  preconditioners: Sequence[Operator | None] | None = None,
  skip: Skip | None = None,
) -> CGResult:
  """Solves ``operators[i](x[i]) = b[i]`` for every block ``i`` by CG.

  Each block stops when ``||r_i|| <= tol ||b_i||``, after ``max_iters``
  iterations, or at breakdown (``p.Ap <= 0`` or non-finite), whichever comes
  first. A zero right-hand side gives a zero solution in 0 iterations. A block
  whose ``b`` or ``x0`` is not finite is not iterated: its ``x`` is ``x0`` and
  its residual is NaN, for the caller to handle.

  Args:
    operators: ``x -> A_i x`` for symmetric positive-definite ``A_i``.
    b: right-hand sides.
    x0: starting points (warm starts), same shapes as ``b``; ``None`` starts
      from zero and saves the first residual's product.
    max_iters: most iterations of any block.
    tol: relative residual tolerance.
    preconditioners: ``r -> M_i^{-1} r`` per block, or ``None`` for none.
    skip: how a converged block skips its preconditioner and operator:
      ``"mask"`` (computed and discarded, no conditional in the loop) or
      ``"cond"`` (one ``lax.cond`` per block and iteration); see the module
      docstring. Both give the same iterates. ``None``: the platform's
      default (:func:`default_skip`).

  Returns:
    A :class:`CGResult`.
  """
  if skip is None:
    skip = default_skip(jax.default_backend())
  if skip not in SKIPS:
    raise ValueError(f"skip must be None or one of {SKIPS}, got {skip!r}")
  n = len(b)
  cold = x0 is None
  if cold:
    x0 = [jnp.zeros_like(bi) for bi in b]
  if not (len(operators) == len(x0) == n):
    raise ValueError(f"need one operator, b and x0 per block, got {len(operators)}, {n}, {len(x0)}")
  if preconditioners is None:
    preconditioners = [None] * n
  precs = list(preconditioners)

  b = list(b)
  bb = _vdots(b, b)
  finite = jnp.stack(
    [jnp.all(jnp.isfinite(bi)) & jnp.all(jnp.isfinite(xi)) for bi, xi in zip(b, x0)]
  )
  zero_rhs = bb == 0
  x = [jnp.where(z, jnp.zeros_like(xi), xi) for z, xi in zip(zero_rhs, x0)]
  live = finite & ~zero_rhs
  if cold:
    r = [jnp.where(lv, bi, 0) for lv, bi in zip(live, b)]
  else:
    ax = _apply_active(operators, x, live, skip)
    r = [jnp.where(lv, bi - axi, bi) for lv, bi, axi in zip(live, b, ax)]
  rr = _vdots(r, r)
  threshold = jnp.square(tol) * bb
  active = live & (rr > threshold)
  iters = jnp.zeros((n,), jnp.int32)

  def cond_fn(carry):
    *_, active, _, k = carry
    return (k < max_iters) & jnp.any(active)

  def body_fn(carry):
    return _iteration(carry, operators, precs, skip, threshold)

  p0 = [jnp.zeros_like(ri) for ri in r]
  carry = (x, r, p0, jnp.zeros_like(rr), rr, active, iters, jnp.asarray(0, jnp.int32))
  x, _, _, _, rr, _, iters, _ = jax.lax.while_loop(cond_fn, body_fn, carry)
  safe_bb = jnp.where(zero_rhs, 1, bb)
  residual = jnp.where(zero_rhs, 0, jnp.sqrt(rr / safe_bb))
  residual = jnp.where(finite, residual, jnp.nan)
  return CGResult(x=x, iterations=iters, residual=residual)
