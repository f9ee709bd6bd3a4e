"""Step control of :func:`scale_by_cgfac`: its state, options and the adaptive-damping probe.

The math lives in :mod:`cgfac_optax._damping` (Levenberg-Marquardt rule),
:mod:`cgfac_optax._clipping` (KL clipping) and :mod:`cgfac_optax._finite`
(skipping non-finite layers); this module holds what ties them to the
transformation, the checks of traced options, and :func:`chain`, which keeps a
skipped step out of the transformations that follow ``scale_by_cgfac``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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
    fallback_skipped: how many parameters without stats were skipped, summed
      over the steps (a non-finite gradient or fallback update: zero update,
      moment kept).
    skipped_steps: how many whole steps were skipped: a traced option
      (damping, ``tol``, learning rate, ...) was not valid, every part of the
      update was skipped, or the output would not have been finite. Such a
      step's update is zero and the state is unchanged but for the counts.
  """

  damping: jax.Array  # shape=(), dtype=float32
  clip: jax.Array  # shape=(), dtype=float32
  skipped: dict[str, jax.Array]  # shape=() each, dtype=int32
  fallback_skipped: jax.Array  # shape=(), dtype=int32
  skipped_steps: jax.Array  # shape=(), dtype=int32


def init(damping, paths) -> StepControlState:
  """The first step's control state: nothing clipped or skipped yet."""
  start = damping.initial if isinstance(damping, AdaptiveDamping) else 0.0
  return StepControlState(
    damping=jnp.asarray(start, jnp.float32),
    clip=jnp.ones([], jnp.float32),
    skipped={p: jnp.zeros([], jnp.int32) for p in paths},
    fallback_skipped=jnp.zeros([], jnp.int32),
    skipped_steps=jnp.zeros([], jnp.int32),
  )


def traced_options_ok(
  *,
  damping=None,
  tol=None,
  learning_rate=None,
  kl_clip=None,
  fallback_decay=None,
  curvature_decay=None,
  momentum=None,
) -> jax.Array:
  """Whether this step's option values are valid, as a scalar bool (``None``: not used).

  The options that arrive as arrays (``optax.inject_hyperparams``) or come from
  schedules cannot be checked at construction; a step with an invalid value is
  skipped as a whole instead of trained with it.
  """
  checks = (
    (damping, lambda v: v > 0),
    (tol, lambda v: (v >= 0) & (v < 1)),
    (learning_rate, lambda v: v >= 0),
    (kl_clip, lambda v: v > 0),
    (fallback_decay, lambda v: (v >= 0) & (v < 1)),
    (curvature_decay, lambda v: (v >= 0) & (v < 1)),
    (momentum, lambda v: (v >= 0) & (v < 1)),
  )
  ok = jnp.ones([], bool)
  for value, good in checks:
    if value is not None:
      v = jnp.asarray(value, jnp.float32)
      ok = ok & jnp.all(jnp.isfinite(v) & good(v))
  return ok


def chain(*transformations, momentum=None) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*transformations)``, the first a ``scale_by_cgfac``, that skips whole steps.

  The state is ``optax.chain``'s (a tuple of the states). A step that the first
  transformation skipped as a whole (its ``control.skipped_steps`` grew), or
  one with a ``momentum`` (the later ``optax.trace``'s) outside ``[0, 1)``,
  leaves the chain: the update is zero and the later transformations keep
  their state (momentum included), except that learning-rate schedules count
  the step, as ``scale_by_cgfac`` does, so that a schedule that returned a bad
  value once moves on. A step skipped for its momentum is added to the first
  transformation's ``control.skipped_steps``.
  """
  first, *rest = (optax.with_extra_args_support(t) for t in transformations)
  momentum = None if isinstance(momentum, (int, float)) else momentum  # checked at construction

  def init_fn(params):
    return (first.init(params), *(t.init(params) for t in rest))

  def update_fn(updates, state, params=None, **extra_args):
    out, head = first.update(updates, state[0], params, **extra_args)
    tail = []
    for t, s in zip(rest, state[1:]):
      out, s = t.update(out, s, params, **extra_args)
      tail.append(s)
    skipped = head.control.skipped_steps > state[0].control.skipped_steps
    bad = ~traced_options_ok(momentum=momentum)
    drop = skipped | bad
    # Schedules count every step; every other later state is kept on a dropped step.
    kept = [
      new if isinstance(old, optax.ScaleByScheduleState) else old
      for new, old in zip(tail, state[1:])
    ]
    zeros = jax.tree.map(jnp.zeros_like, out)
    out, tail = jax.lax.cond(drop, lambda: (zeros, kept), lambda: (out, tail))
    counted = head.control.skipped_steps + (bad & ~skipped).astype(jnp.int32)
    head = head._replace(control=head.control._replace(skipped_steps=counted))
    return out, (head, *tail)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def at_count(option, count) -> Any:
  """A float, array or schedule option's value at step ``count``."""
  return option(count) if callable(option) else option


def damping_now(damping, state: StepControlState, count) -> Any:
  """The damping of this step's solve."""
  if isinstance(damping, AdaptiveDamping):
    return state.damping
  return at_count(damping, count)


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


def next_damping(damping, state: StepControlState, count, gamma, step, value, value_fn):
  """A schedule's value (the last good one if not finite), or the adapted damping.

  ``step`` is the policy's :class:`~cgfac_optax._policy.Step`. Adaptive damping is
  also raised, by one adaptation's factor, on any step the quadratic model's step
  had to be shortened: the model was trusted too far.
  """
  current = jnp.asarray(gamma, jnp.float32)
  current = jnp.where(jnp.isfinite(current), current, state.damping)
  if not isinstance(damping, AdaptiveDamping) or step.probe is None:
    return current
  adapted = adapted_damping(damping, count, current, value, value_fn, step.probe, step.predicted)
  raised = jnp.clip(current / damping.factor, damping.minimum, damping.maximum)
  return jnp.where(step.shortened, jnp.maximum(adapted, raised), adapted)


def needs(damping) -> dict[str, str]:
  """The extra arguments of ``update`` the damping reads: ``{name: "adaptive damping"}``."""
  if not isinstance(damping, AdaptiveDamping):
    return {}
  return {n: "adaptive damping" for n in ("params", "value", "value_fn")}
