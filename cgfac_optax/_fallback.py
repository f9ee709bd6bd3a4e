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
  A gradient with a NaN or an infinity gives a non-finite update (for
  ``optax.apply_if_finite`` to catch) and leaves the moment as it was.
- ``"identity"``: the gradient passes through unchanged (plain SGD with the
  chain's momentum and learning rate).
- ``"error"``: raise at ``update``, listing every uncovered parameter path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


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
) -> tuple[dict[int, jax.Array], dict[int, jax.Array]]:
  """The fallback update of each uncovered leaf, and the new moments, by leaf index.

  Raises:
    ValueError: for ``fallback="error"`` when some parameter is uncovered.
  """
  if not missing or fallback == "identity":
    return {i: grads[i] for i in missing}, {}
  if fallback == "error":
    listed = ", ".join(repr(paths[i]) for i in missing)
    raise ValueError(
      f"fallback='error': {len(missing)} parameter(s) have no curvature stats: {listed}. "
      "Pass stats for their layers, or choose fallback='diagonal' or 'identity'"
    )
  t = optax.safe_increment(count)
  out, new_moments = {}, {}
  for i in missing:
    g, m = grads[i], moments[i]
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    g32, beta = g.astype(dtype), jnp.asarray(decay, dtype)
    v = beta * m.astype(dtype) + (1 - beta) * g32 * g32
    correction = 1 - beta ** t.astype(dtype)
    out[i] = (g32 / (v / correction + jnp.asarray(gamma, dtype))).astype(g.dtype)
    # A non-finite gradient never reaches the state: the moment keeps its last value (the
    # update is non-finite, for optax.apply_if_finite to catch).
    new_moments[i] = jnp.where(jnp.all(jnp.isfinite(v)), v, m).astype(m.dtype)
  return out, new_moments
