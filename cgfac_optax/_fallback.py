r"""Parameters without curvature stats: a documented update for every one of them.

A parameter is *covered* when it is the ``kernel`` or ``bias`` of a layer with
stats in ``layer_stats``; every other parameter (LayerNorm and RMSNorm scales
and biases, embeddings, layers the capture does not know, a layer whose stats
were left out) gets the update of the ``fallback`` option:

- ``"diagonal"`` (default): the damped natural gradient of a diagonal
  empirical Fisher,

  .. math::

    v_t = \beta v_{t-1} + (1 - \beta)\, g_t^2, \qquad
    \hat v_t = v_t / (1 - \beta^t), \qquad
    u_t = g_t / (\hat v_t + \gamma),

  with ``v`` kept in the state (``fallback_moment``), ``beta =
  fallback_decay`` and the same damping ``gamma`` as the Kronecker blocks. It
  is RMSProp's second moment used *without* the square root: a damped
  ``F^{-1} g`` step in the same units as the layers' K-FAC steps, so one
  learning rate fits both. Like Adam's, the estimate uses the mini-batch
  gradient, not per-example gradients (which the uncaptured parameters do not
  have), so it is lower than the per-example Fisher and the damping bounds the
  step: ``|u| <= |g| / gamma`` and ``|u| <= 1 / (2 sqrt(gamma (1 - beta)))``
  (at ``t = 1``, ``|u| <= 1 / (2 sqrt(gamma))``).
- ``"identity"``: the gradient passes through unchanged (plain SGD with the
  chain's momentum and learning rate).
- ``"error"``: raise at ``update``, listing every uncovered parameter path.

Whatever the fallback, a parameter whose gradient (or ``"diagonal"`` update)
holds a NaN or an infinity is *skipped* for the step: its update is zero and
its moment keeps its last value, so nothing non-finite leaves this module.

The first time ``update`` is traced with a new set of uncovered parameters,
the ``"diagonal"`` and ``"identity"`` fallbacks log (logger ``cgfac_optax``,
level ``WARNING``) which parameters they take, so that no parameter goes
without curvature unnoticed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

logger = logging.getLogger("cgfac_optax")

# The (fallback, uncovered paths) already announced: each is logged once per process.
_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def announce(fallback: str, paths: Sequence[str]) -> None:
  """Logs, once per distinct set, the parameters that take the fallback update."""
  key = (fallback, tuple(paths))
  if not paths or key in _ANNOUNCED:
    return
  _ANNOUNCED.add(key)
  logger.warning(
    "cgfac_optax: %d parameter(s) have no curvature stats and take the %r fallback update: "
    "%s. Pass stats for their layers (cgfac_optax.flax.register_rule for a layer kind the "
    "capture does not know), or fallback='error' to refuse such parameters",
    len(paths),
    fallback,
    ", ".join(map(repr, paths)),
  )


def init(params: Any, fallback: str) -> Any:
  """The fallback's state: the second moment like params, or ``None`` if it keeps none."""
  return optax.tree.zeros_like(params) if fallback == "diagonal" else None


def updates(
  fallback: str,
  paths: Sequence[str],
  grads: Sequence[jax.Array],
  missing: Sequence[int],
  moments: Sequence[jax.Array] | None,
  gamma,
  count: jax.Array,
  decay,
) -> tuple[dict[int, jax.Array], dict[int, jax.Array], jax.Array]:
  """The fallback update of each uncovered leaf and the new moments, by leaf index.

  Returns:
    ``(updates, moments, skipped)``: a skipped leaf (non-finite gradient or
    update) has a zero update and its old moment; ``skipped`` is how many
    leaves were skipped (int32).

  Raises:
    ValueError: for ``fallback="error"`` when some parameter is uncovered.
  """
  if not missing:
    return {}, {}, jnp.zeros([], jnp.int32)
  if fallback == "error":
    listed = ", ".join(repr(paths[i]) for i in missing)
    raise ValueError(
      f"fallback='error': {len(missing)} parameter(s) have no curvature stats: {listed}. "
      "Pass stats for their layers, or choose fallback='diagonal' or 'identity'"
    )
  announce(fallback, [paths[i] for i in missing])
  out, new_moments, skipped = {}, {}, []
  t = optax.safe_increment(count)
  for i in missing:
    g = grads[i]
    if fallback == "identity":
      ok = jnp.all(jnp.isfinite(g))
      u = g
    else:
      m = moments[i]
      dtype = jnp.promote_types(g.dtype, jnp.float32)
      g32, beta = g.astype(dtype), jnp.asarray(decay, dtype)
      v = beta * m.astype(dtype) + (1 - beta) * g32 * g32
      correction = 1 - beta ** t.astype(dtype)
      u = (g32 / (v / correction + jnp.asarray(gamma, dtype))).astype(g.dtype)
      ok = jnp.all(jnp.isfinite(v)) & jnp.all(jnp.isfinite(u))
      new_moments[i] = jnp.where(ok, v, m).astype(m.dtype)
    out[i] = jnp.where(ok, u, jnp.zeros_like(u))
    skipped.append(~ok)
  return out, new_moments, jnp.stack(skipped).sum(dtype=jnp.int32)
