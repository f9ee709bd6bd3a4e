r"""Levenberg-Marquardt adaptive damping (Martens 2010; Martens & Grosse 2015, sec. 6.5).

Every ``interval`` steps the loss is measured at the probe point
``theta + s`` with ``s = -lr c x`` (the preconditioned step, after KL clipping,
before momentum) and compared with the decrease the quadratic model predicts,

.. math::

  \rho = \frac{L(\theta + s) - L(\theta)}{M(s)}, \qquad
  M(s) = \nabla L^\top s + \tfrac12 s^\top F s .

``M`` is the *undamped* K-FAC model, as in Martens & Grosse and kfac-jax. It
needs no curvature product: with ``t = lr c``,
``grad^T s = -t <x, grad>`` and ``s^T F s = t^2 (<x, (F + gamma I) x> -
gamma ||x||^2) ~= t^2 (<x, grad> - gamma ||x||^2)``, using the solve's own
``(F + gamma I) x ~= grad`` (exact for the direct solvers, up to the CG
residual otherwise; clamped at 0 so an inexact solve never predicts negative
curvature).

Then the damping is raised (divided by ``decay ** interval``) when
``rho < 1/4`` or the probe loss is not finite, lowered (multiplied by it) when
``rho > 3/4``, and kept between ``minimum`` and ``maximum``. When the model
predicts no decrease (a zero gradient, or ``t >= 2``) there is nothing to
compare and the damping is kept.

The rule judges the model along the probed step. When that step is short
(a small learning rate, or KL clipping active: ``t << 1``) the first-order
term dominates both the actual and the predicted change, ``rho`` tends to 1
and the damping falls toward ``minimum``; the adaptation says most when the
probed step is a full one (``t`` near 1, as with kfac-jax's adaptive learning
rate).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cgfac_optax._options import check_int, check_number


@dataclasses.dataclass(frozen=True)
class AdaptiveDamping:
  """Options of Levenberg-Marquardt adaptive damping; pass it as ``damping=``.

  Attributes:
    initial: the damping of the first steps.
    minimum: the damping never goes below this.
    maximum: the damping never goes above this.
    decay: per-step decay; each adaptation multiplies or divides the damping
      by ``decay ** interval`` (Martens & Grosse use ``0.95`` and ``5``).
    interval: adapt every this-many steps (each adaptation costs one extra
      evaluation of the loss, through ``value_fn``).
  """

  initial: float = 1e-3
  minimum: float = 1e-8
  maximum: float = 1e3
  decay: float = 0.95
  interval: int = 5

  def __post_init__(self):
    for name in ("initial", "minimum", "maximum"):
      value = getattr(self, name)
      check_number(
        f"AdaptiveDamping.{name}", value, lambda v: v > 0, "a number > 0", traced_ok=False
      )
    if not self.minimum <= self.initial <= self.maximum:
      raise ValueError(
        "AdaptiveDamping needs minimum <= initial <= maximum, got "
        f"{self.minimum!r}, {self.initial!r}, {self.maximum!r}"
      )
    check_number(
      "AdaptiveDamping.decay", self.decay, lambda d: 0 < d < 1, "in (0, 1)", traced_ok=False
    )
    check_int("AdaptiveDamping.interval", self.interval, 1)

  @property
  def factor(self) -> float:
    """What one adaptation multiplies (``rho > 3/4``) or divides (``rho < 1/4``) the damping by."""
    return self.decay**self.interval


def predicted_change(x_dot_grad, x_sq, damping, step) -> jax.Array:
  """``M(s)`` for ``s = -step x``: ``-step <x, g> + step^2/2 max(<x, g> - gamma ||x||^2, 0)``."""
  curvature = jnp.maximum(x_dot_grad - damping * x_sq, 0)
  return -step * x_dot_grad + 0.5 * jnp.square(step) * curvature


NO_INFORMATION = 0.5
"""The ratio :func:`reduction_ratio` returns when there is nothing to compare.

It lies inside the band ``[1/4, 3/4]`` in which the Levenberg-Marquardt rule
keeps the damping, so a caller that feeds it to the rule changes nothing.
"""


def reduction_ratio(loss_before, loss_after, predicted) -> jax.Array:
  """``rho = (loss_after - loss_before) / predicted``: the actual change over the model's.

  :func:`adapt` raises the damping when ``rho < 1/4`` and lowers it when
  ``rho > 3/4``. Guards:

  - ``loss_before`` finite and ``loss_after`` not (the step blew up):
    ``-inf``, worse than any finite ratio, whatever ``predicted`` is.
  - otherwise ``predicted >= 0`` or not finite, or ``loss_before`` not
    finite: nothing to compare, :data:`NO_INFORMATION` (``0.5``).

  Never NaN; in at least float32.
  """
  dtype = jnp.promote_types(jnp.result_type(loss_before, loss_after, predicted), jnp.float32)
  before = jnp.asarray(loss_before, dtype)
  after = jnp.asarray(loss_after, dtype)
  predicted = jnp.asarray(predicted, dtype)
  measured = (predicted < 0) & jnp.isfinite(predicted) & jnp.isfinite(before) & jnp.isfinite(after)
  # A huge finite change over a tiny prediction can still overflow to -inf or +inf; that reads as
  # the verdict it should (very bad or very good).
  rho = (after - before) / jnp.where(measured, predicted, -1)
  # 0 / 0 when a denormal prediction is flushed to zero on the way.
  rho = jnp.where(measured & ~jnp.isnan(rho), rho, jnp.asarray(NO_INFORMATION, dtype))
  blew_up = jnp.isfinite(before) & ~jnp.isfinite(after)
  return jnp.where(blew_up, jnp.asarray(-jnp.inf, dtype), rho)


def adapt(damping, loss_before, loss_after, predicted, options: AdaptiveDamping) -> jax.Array:
  """The next damping from one reduction ratio (the rule in this module's docstring)."""
  rho = reduction_ratio(loss_before, loss_after, predicted)
  new = jnp.where(rho < 0.25, damping / options.factor, damping)
  new = jnp.where(rho > 0.75, damping * options.factor, new)
  return jnp.clip(new, options.minimum, options.maximum).astype(jnp.asarray(damping).dtype)
