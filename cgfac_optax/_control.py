"""Step control of :func:`scale_by_cgfac`: its state, options and the adaptive-damping probe.

The math lives in :mod:`cgfac_optax._damping` (Levenberg-Marquardt rule),
:mod:`cgfac_optax._clipping` (KL clipping) and :mod:`cgfac_optax._finite`
(skipping non-finite layers); this module holds what ties them to the
transformation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _damping
from cgfac_optax._damping import AdaptiveDamping


class StepControlState(NamedTuple):
  """Step-control part of :class:`ScaleByCGFACState`: arrays only.

  Attributes:
    damping: with :class:`AdaptiveDamping`, the damping of the next solve;
      otherwise the damping of the last solve.
    clip: the last KL-clipping factor ``c`` in ``[0, 1]`` (1: not clipped).
    skipped: per layer path, how many steps the layer was skipped because its
      gradient, stats or solve were not finite (its update was zero and its
      warm start was reset).
  """

  damping: jax.Array  # shape=(), dtype=float32
  clip: jax.Array  # shape=(), dtype=float32
  skipped: dict[str, jax.Array]  # shape=() each, dtype=int32


def init(damping, paths) -> StepControlState:
  """The first step's control state: nothing clipped or skipped yet."""
  start = damping.initial if isinstance(damping, AdaptiveDamping) else 0.0
  return StepControlState(
    damping=jnp.asarray(start, jnp.float32),
    clip=jnp.ones([], jnp.float32),
    skipped={p: jnp.zeros([], jnp.int32) for p in paths},
  )


def at_count(option, count) -> Any:
  """A float, array or schedule option's value at step ``count``."""
  return option(count) if callable(option) else option


def damping_now(damping, state: StepControlState, count) -> Any:
  """The damping of this step's solve."""
  if isinstance(damping, AdaptiveDamping):
    return state.damping
  return at_count(damping, count)


def check_adaptive_args(params, value, value_fn) -> None:
  """Adaptive damping evaluates the loss at a probe point: it needs these extra arguments."""
  missing = [
    n for n, v in (("params", params), ("value", value), ("value_fn", value_fn)) if v is None
  ]
  if missing:
    raise ValueError(
      f"adaptive damping needs {', '.join(missing)}: call tx.update(grads, state, params, "
      "layer_stats=stats, value=loss, value_fn=lambda p: loss_fn(p, batch)), where loss is the "
      "loss at params on this batch and value_fn evaluates it at other parameters"
    )
  if not callable(value_fn):
    raise TypeError(f"value_fn must be a callable params -> loss, got {type(value_fn).__name__}")


def adapted_damping(
  options: AdaptiveDamping,
  count: jax.Array,
  damping: jax.Array,
  value: jax.Array,
  value_fn: Callable[[Any], jax.Array],
  probe: Callable[[], Any],
  predicted: jax.Array,
) -> jax.Array:
  """The damping after this step: adapted on every ``interval``-th step, else unchanged.

  ``probe()`` builds the parameters at the probe point; ``value_fn`` runs only
  on adaptation steps (``lax.cond``).
  """

  def adapt():
    loss_after = jnp.asarray(value_fn(probe()), jnp.float32)
    return _damping.adapt(damping, jnp.asarray(value, jnp.float32), loss_after, predicted, options)

  return jax.lax.cond(count % options.interval == 0, adapt, lambda: damping)
