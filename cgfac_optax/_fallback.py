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

FALLBACKS = ("diagonal", "identity", "error")


def validate(fallback: str, decay) -> None:
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
  # An array decay (optax.inject_hyperparams) is the user's to check.
  if isinstance(decay, bool) or (isinstance(decay, (int, float)) and not 0 <= decay < 1):
    raise ValueError(f"fallback_decay must be a float in [0, 1), got {decay!r}")


def init(params: Any, fallback: str) -> Any:
  """The fallback's state: the second moment like params, or ``None`` if it keeps none."""
  return optax.tree.zeros_like(params) if fallback == "diagonal" else None


def apply(
  fallback: str,
  paths: Sequence[str],
  grads: Sequence[jax.Array],
  out: list,
  covered: set[int],
  moments: list | None,
  gamma,
  count: jax.Array,
  decay: float,
) -> None:
  """Writes the fallback update of every uncovered leaf into ``out`` (and ``moments``).

  Raises:
    ValueError: for ``fallback="error"`` when some parameter is uncovered.
  """
  missing = [i for i in range(len(grads)) if i not in covered]
  if not missing:
    return
  if fallback == "error":
    listed = ", ".join(repr(paths[i]) for i in missing)
    raise ValueError(
      f"fallback='error': {len(missing)} parameter(s) have no curvature stats: {listed}. "
      "Pass stats for their layers, or choose fallback='diagonal' or 'identity'"
    )
  if fallback == "identity":
    return
  t = optax.safe_increment(count)
  for i in missing:
    g = grads[i]
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    g32, beta = g.astype(dtype), jnp.asarray(decay, dtype)
    v = beta * moments[i].astype(dtype) + (1 - beta) * g32 * g32
    correction = 1 - beta ** t.astype(dtype)
    u = g32 / (v / correction + jnp.asarray(gamma, dtype))
    out[i] = u.astype(g.dtype)
    # A non-finite gradient never reaches the state: the moment keeps its last value (the
    # update is non-finite, for optax.apply_if_finite to catch).
    moments[i] = jnp.where(jnp.all(jnp.isfinite(v)), v, moments[i]).astype(moments[i].dtype)
