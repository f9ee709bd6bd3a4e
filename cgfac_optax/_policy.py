"""Step policies: how :func:`scale_by_cgfac` turns preconditioned gradients into its step.

The solver stage (:mod:`._precondition`) gives every layer's solution ``x`` of
``(F + gamma I) x = grad``; a *step policy* decides what the transformation outputs
from it. The policy is chosen once, when the transformation is built, and
``update`` composes it; two exist:

- :mod:`._fixed_rate`: the output is the preconditioned gradient, scaled by one
  KL-clipping factor, for the chain's learning rate (and momentum) to follow;
  with adaptive damping it also predicts the loss change along the step.
- :mod:`._quadratic_step`: the output is the whole step ``-(alpha D + mu
  delta_prev)``, with ``(alpha, mu)`` from the local quadratic model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from cgfac_optax._clipping import ScaledSum
from cgfac_optax._precondition import Leaves, Preconditioned, Solved


class StepInputs(NamedTuple):
  """What a policy's ``step`` reads."""

  solved: Solved  # every layer's system and solution
  pre: Preconditioned  # the update by leaf, fallback included
  leaves: Leaves  # the gradients by leaf
  scale: ScaledSum  # the factor the policy's ``scale`` gave the layers' updates
  state: Any  # the ScaleByCGFACState before the step
  gamma: Any  # this step's damping
  params: Any
  value: Any  # the loss at params on this batch, or None
  curvature_model: Any


class Step(NamedTuple):
  """The output leaves and what the next damping and state need of the step taken."""

  out: list  # the transformation's output by leaf (the gradient's sign)
  previous: Any  # the state's previous_update after this step
  coefficients: Any  # the state's coefficients after this step
  predicted: jax.Array | None  # the quadratic model's change along the probed step
  probe: Any  # () -> params at the probed step, or None
  shortened: jax.Array | bool = False  # the step was cut to its bound (raise the damping)
  ok: jax.Array | bool = True  # False: skip the whole step (e.g. it is not finite)


class StepPolicy(NamedTuple):
  """One way of taking a step.

  Attributes:
    name: what the policy is called in messages.
    needs: ``{extra argument of update: why}``, the arguments it reads.
    init: ``params -> (previous_update, coefficients)``, the state fields it
      owns (``None`` for each it does not keep).
    scale: ``(solved, count) -> ScaledSum``, one factor on every layer's update.
    step: ``StepInputs -> Step``.
    options_ok: ``count -> bool array``, whether its traced options are valid.
  """

  name: str
  needs: Mapping[str, str]
  init: Callable[[Any], tuple[Any, Any]]
  scale: Callable[[Solved, jax.Array], ScaledSum]
  step: Callable[[StepInputs], Step]
  options_ok: Callable[[jax.Array], jax.Array]
