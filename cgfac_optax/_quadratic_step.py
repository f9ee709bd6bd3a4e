"""The quadratic-model step policy: step size and momentum from the local quadratic model.

The output is the whole step ``-delta``, ``delta = alpha D + mu delta_prev``,
with ``D`` the negated preconditioned gradient (every parameter, fallback
included) and ``(alpha, mu)`` the minimizer of the damped quadratic model of
the loss in the plane of ``D`` and the previous step (:mod:`._quadratic` holds
the math: the exact Fisher's Gram matrix from two Jacobian-vector products, and
the 2x2 solve). The chain negates it, with no learning rate or momentum after
it. Given the loss ``value``, a step along which the undamped model predicts a
decrease of more than half the loss is shortened to where it predicts exactly
half (:func:`bounded_by_loss`), and adaptive damping is raised on that step.
The undamped model's change at ``delta`` is what Levenberg-Marquardt damping
compares the loss at ``params + delta`` to.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import optax

from cgfac_optax import _finite, _quadratic
from cgfac_optax._clipping import no_clip
from cgfac_optax._policy import Step, StepInputs, StepPolicy

# The largest share of the loss one step may be predicted to remove (see bounded_by_loss).
MAX_PREDICTED_DECREASE = 0.5


def bounded_by_loss(x, undamped, b, value):
  """``(t x, M(t x), shortened)``: the coefficients cut to a predicted decrease of half the loss.

  The losses of the table are never negative, so no step can lower the loss by
  more than its value ``L``, and a quadratic model that predicts a large share
  of that from one step is extrapolating: one batch's exact model with a small
  damping fits that batch (on a classifier, cutting its loss while the test
  loss rises), or a nearly singular 2x2 system picks huge coefficients. Where
  the undamped model ``M(x) = 1/2 x^T U x + b^T x`` predicts more than
  ``L_max = MAX_PREDICTED_DECREASE * L`` (one half), the step is shortened
  along itself to the first point where ``M(t x) = -L_max``, the smaller root
  ``t`` of ``q t^2 + p t + L_max = 0`` with ``p = b^T x < 0`` and ``q = 1/2
  x^T U x >= 0``, in the form that stays exact when ``q = 0``: ``t = 2 L_max /
  (-p + sqrt(p^2 - 4 q L_max))``. With no ``value``, or one that is not finite
  and positive, nothing changes.
  """
  predicted = 0.5 * x @ undamped @ x + b @ x
  if value is None:
    return x, predicted, jnp.asarray(False)
  bound = MAX_PREDICTED_DECREASE * jnp.asarray(value, predicted.dtype)
  valid = jnp.isfinite(bound) & (bound > 0)
  shortened = valid & (predicted < -bound)
  p = b @ x
  q = 0.5 * x @ undamped @ x
  root = jnp.sqrt(jnp.maximum(jnp.square(p) - 4 * q * bound, 0))
  t = jnp.where(shortened, 2 * bound / jnp.where(shortened, root - p, 1), 1)
  t = jnp.clip(t, 0, 1)
  x = t * x
  return x, 0.5 * x @ undamped @ x + b @ x, shortened


def _flat(leaves, dtype) -> jax.Array:
  """The leaves as one vector: the model's dot products are then one reduction each."""
  return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])


def _unflat(vector: jax.Array, like: list) -> list:
  """``vector`` split back into leaves shaped and typed like ``like``."""
  sizes = [x.size for x in like]
  parts = jnp.split(vector, list(itertools.accumulate(sizes))[:-1])
  return [p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, like)]


def _coefficients(model, params, direction, previous, g, gamma, like, treedef):
  """``(alpha, mu)`` of the damped model, the undamped Gram matrix, and ``b`` (flat vectors)."""
  vectors = [treedef.unflatten(_unflat(v, like)) for v in (direction, previous)]
  undamped = _quadratic.gram(model, params, vectors)
  dtype = undamped.dtype
  u = jnp.stack([direction, previous]).astype(dtype)
  norms = u @ u.T
  b = u @ g.astype(dtype)
  damped = undamped + jnp.asarray(gamma, dtype) * norms
  x, _ = _quadratic.step_coefficients(damped, b)
  return x, undamped, b


def quadratic_step(out, grads, previous, params, model, gamma, treedef, value=None) -> Step:
  """``-delta`` by leaf, ``(alpha, mu)``, the undamped model's change at ``delta``, the probe.

  ``D = -out`` is the preconditioned direction (every parameter, fallback
  included). A non-finite ``D`` or gradient makes the whole step zero. With
  the loss ``value`` the step is never predicted to remove more than half of
  it (:func:`bounded_by_loss`). The arithmetic runs on the parameters as one
  vector (at least float32).
  """
  dtype = functools.reduce(jnp.promote_types, [x.dtype for x in out], jnp.float32)
  direction = -_flat(out, dtype)
  previous = _flat(treedef.flatten_up_to(previous), dtype)
  g = _flat(grads, dtype)
  finite = _finite.all_finite(direction, previous, g)
  direction, previous, g = (jnp.where(finite, v, 0) for v in (direction, previous, g))
  x, undamped, b = _coefficients(model, params, direction, previous, g, gamma, out, treedef)
  x = jnp.where(finite, x, 0)
  x, predicted, shortened = bounded_by_loss(x, undamped, b, value)
  delta = _unflat(x[0] * direction + x[1] * previous, out)
  param_leaves = treedef.flatten_up_to(params)
  probe = lambda: treedef.unflatten([(p + d).astype(p.dtype) for p, d in zip(param_leaves, delta)])
  out = [-d for d in delta]
  return Step(out, treedef.unflatten(delta), x.astype(jnp.float32), predicted, probe, shortened)


def _step(inputs: StepInputs) -> Step:
  model = _quadratic.checked(inputs.curvature_model)
  state, grads = inputs.state, inputs.leaves.grads
  step = quadratic_step(
    inputs.pre.out,
    grads,
    state.previous_update,
    inputs.params,
    model,
    inputs.gamma,
    inputs.leaves.treedef,
    inputs.value,
  )
  # One step over all parameters: a non-finite gradient or step skips it whole (the step is
  # zero where the direction, the previous step or the gradient was not finite).
  return step._replace(ok=_finite.all_finite(step.coefficients) & _step_finite(step, grads))


def _step_finite(step: Step, grads) -> jax.Array:
  """Whether the gradient and the step's output are finite, as one reduction."""
  leaves = [*grads, *step.out]
  return _finite.all_finite(_flat(leaves, jnp.float32)) if leaves else jnp.ones([], bool)


POLICY = StepPolicy(
  name="the quadratic model's step",
  needs={"params": "the quadratic model", "curvature_model": "the quadratic model"},
  init=lambda params: (optax.tree.zeros_like(params), jnp.zeros([2], jnp.float32)),
  scale=lambda solved, count: no_clip(jnp.float32),
  step=_step,
  options_ok=lambda count: jnp.ones([], bool),
)
