"""The fixed-rate step policy: the preconditioned gradient for a learning rate that follows.

The output is every layer's solution ``x``, scaled by one common KL-clipping
factor ``c`` (:mod:`._clipping`) when ``kl_clip`` is set, with the sign of the
gradient; the chain applies momentum and the learning rate after it (as
:func:`cgfac_optax.cgfac` does). With adaptive damping the policy also gives
what the Levenberg-Marquardt rule compares (:mod:`._damping`): the quadratic
model's change along the probed step ``-lr c x``, computed from the solve alone,
and the probe point itself.
"""

from __future__ import annotations

import jax.numpy as jnp

from cgfac_optax import _clipping, _control, _damping, _layers
from cgfac_optax._clipping import ScaledSum
from cgfac_optax._policy import Step, StepInputs, StepPolicy
from cgfac_optax._precondition import Solved


def _x_dot_grad(solved: Solved) -> ScaledSum:
  return _clipping.x_dot_grad(
    [x.x for x in solved.solutions],
    [s.unit.b for s in solved.systems],
    [s.unit.exponent for s in solved.systems],
  )


def kl_clip_factor(solved: Solved, learning_rate, bound) -> ScaledSum:
  """``c = min(1, sqrt(bound / (lr^2 sum_l <x_l, grad_l>)))``; 1 without a bound or layers."""
  if not solved.systems or bound is None:
    return _clipping.no_clip(jnp.float32)
  return _clipping.kl_clip_factor(_x_dot_grad(solved), learning_rate, bound)


def predicted_change(solved: Solved, learning_rate, clip: ScaledSum, damping):
  """The undamped quadratic model's change along ``-lr c x`` (see :mod:`._damping`)."""
  x_sq = _clipping.scaled_sum(
    [jnp.sum(x.x * x.x) for x in solved.solutions],
    [2 * s.unit.exponent for s in solved.systems],
  )
  step = jnp.asarray(learning_rate, jnp.float32) * clip.value()
  xg = _x_dot_grad(solved).value()
  return _damping.predicted_change(xg, x_sq.value(), damping, step)


def probe(params, updates, moved: set[int], learning_rate, treedef):
  """``() -> params - lr * updates`` on the leaves ``moved`` (the adaptive-damping probe point)."""
  param_leaves = treedef.flatten_up_to(params)

  def point():
    leaves = [
      (p - learning_rate * u).astype(p.dtype) if i in moved else p
      for i, (p, u) in enumerate(zip(param_leaves, updates))
    ]
    return treedef.unflatten(leaves)

  return point


def policy(learning_rate, kl_clip, *, adaptive_damping: bool) -> StepPolicy:
  """The fixed-rate policy for ``learning_rate`` (a float, array or schedule) and ``kl_clip``.

  ``adaptive_damping``: also give the prediction and the probe point.
  """
  rate = lambda count: _control.at_count(learning_rate, count)

  def step(inputs: StepInputs) -> Step:
    out, solved, state = inputs.pre.out, inputs.solved, inputs.state
    if not adaptive_damping or not solved.layers:
      return Step(out, None, None, None, None)
    lr = rate(state.count)
    treedef = inputs.leaves.treedef
    return Step(
      out,
      None,
      None,
      predicted=predicted_change(solved, lr, inputs.scale, state.control.damping),
      probe=probe(inputs.params, out, _layers.covered(solved.layers), lr, treedef),
    )

  return StepPolicy(
    name="the fixed-rate step",
    needs={},
    init=lambda params: (None, None),
    scale=lambda solved, count: kl_clip_factor(solved, rate(count), kl_clip),
    step=step,
    options_ok=lambda count: _control.traced_options_ok(learning_rate=rate(count), kl_clip=kl_clip),
  )
