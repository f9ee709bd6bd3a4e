r"""The local quadratic model that sets the step size and momentum (Martens & Grosse 2015, sec. 7).

A preconditioned direction ``D`` (the approximate natural gradient, a descent
direction for the *negative* sign convention below) fixes where to go but not
how far. Following section 7 of Martens & Grosse, "Optimizing Neural Networks
with Kronecker-factored Approximate Curvature" (arXiv:1503.05671), the update
is taken in the plane spanned by ``D`` and the previous update
``delta_prev``,

.. math::

  \delta = \alpha D + \mu \, \delta_{\text{prev}},

and ``(alpha, mu)`` minimize the damped quadratic model of the loss around
the current parameters,

.. math::

  M(\delta) = \tfrac12 \delta^\top (F + \lambda I) \delta + \nabla L^\top \delta ,

where ``F`` is the *exact* Fisher (for the losses of :mod:`cgfac_optax._losses`,
equal to the generalized Gauss-Newton matrix ``J^T H J``) and ``lambda`` the
damping. Writing ``u_1 = D``, ``u_2 = delta_prev``, ``C_ij = u_i^T (F +
lambda I) u_j`` and ``b_i = grad^T u_i``, this is the two-variable problem
``min_x 1/2 x^T C x + b^T x`` with minimizer ``x* = -C^{-1} b`` and minimum
``M(x*) = 1/2 b^T x*`` (never positive when ``C`` is positive definite). The
Gram matrix needs only ``J u_i``, two forward-mode products through the model
on a subsample, and the output Hessian ``H``: no backward pass and nothing of
the size of ``F``. Both the step size and the momentum are thereby chosen by
the curvature itself rather than fixed by hand.

On the first step there is no ``delta_prev``; the problem is then the 1-D line
search ``alpha = -b_1 / C_11`` along ``D`` (and ``mu = 0``). The same 1-D
solve is the fallback whenever the 2x2 system is singular or badly
conditioned (``D`` and ``delta_prev`` nearly parallel in the ``C`` metric), or
holds non-finite numbers: the 1-D minimum is the best point on a line inside
the plane, so it is never worse in the model than a wrong 2-D solve.

The predicted change ``M(delta)`` is also what Levenberg-Marquardt damping
compares the actual change of the loss to (Martens & Grosse, sec. 6.5):
:func:`cgfac_optax._damping.reduction_ratio` computes ``rho = (L(theta +
delta) - L(theta)) / M(delta)``, and :func:`cgfac_optax._damping.adapt`
applies the rule to it.

Everything here is a pure function of arrays and safe under ``jax.jit``:
nothing raises on data and nothing returns NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cgfac_optax import _losses

Params = Any


class _CurvatureModelFields(NamedTuple):
  outputs_fn: Callable[[Params], jax.Array]
  loss: str


class CurvatureModel(_CurvatureModelFields):
  """What the optimizer needs for exact Fisher products; pass it to ``update``.

  Attributes:
    outputs_fn: the model's outputs (logits or means, ``(examples, ..., k)``)
      on the examples the step is judged on, as a function of the parameters
      alone; close over the inputs. The helpers use the batch's first
      ``quadratic_batch_size`` examples (a quarter of the batch by default).
    loss: a key of the loss table (``"softmax_cross_entropy"``,
      ``"sigmoid_binary_cross_entropy"`` or ``"squared_error"``), the loss the
      outputs are trained with.
  """

  __slots__ = ()

  def __new__(cls, outputs_fn: Callable[[Params], jax.Array], loss: str):
    if not callable(outputs_fn):
      raise TypeError(f"CurvatureModel.outputs_fn must be callable, got {outputs_fn!r}")
    if not isinstance(loss, str) or loss not in _losses.LOSSES:
      raise ValueError(f"CurvatureModel.loss must be one of {sorted(_losses.LOSSES)}, got {loss!r}")
    return super().__new__(cls, outputs_fn, loss)


def checked(model: Any) -> CurvatureModel:
  """``model``, if it is a :class:`CurvatureModel`; else a ``TypeError`` that says what it is."""
  if not isinstance(model, CurvatureModel):
    raise TypeError(
      "curvature_model must be a cgfac_optax.CurvatureModel(outputs_fn, loss), "
      f"got {type(model).__name__}"
    )
  return model


def gram(model: CurvatureModel, params: Params, vectors: Sequence[Params]) -> jax.Array:
  """The ``(k, k)`` matrix ``C_ij = u_i^T F u_j`` of the exact Fisher of the mean loss.

  ``F = J^T H J`` with ``J`` the Jacobian of ``model.outputs_fn`` at
  ``params`` and ``H`` the output Hessian of the mean-over-examples loss
  (:attr:`cgfac_optax._losses.LossKind.output_hvp`). The model is linearized
  once; each vector costs one Jacobian-vector product.

  Args:
    model: the outputs function and its loss.
    params: where to take the curvature.
    vectors: ``k`` pytrees shaped like ``params`` (cast to the parameters'
      dtypes for the product).

  Returns:
    The symmetric ``(k, k)`` Gram matrix, in at least float32 (undamped: add
    ``lambda u_i^T u_j`` for the damped model).
  """
  kind = _losses.get_loss(model.loss)
  vectors = list(vectors)
  if not vectors:
    raise ValueError("gram needs at least one vector")
  outputs, jvp = jax.linearize(model.outputs_fn, params)
  dtype = jnp.promote_types(outputs.dtype, jnp.float32)
  outputs = outputs.astype(dtype)
  leaves, treedef = jax.tree.flatten(params)
  dtypes = [jnp.asarray(leaf).dtype for leaf in leaves]
  tangents = []
  for u in vectors:
    u_leaves = treedef.flatten_up_to(u)
    u = treedef.unflatten([jnp.asarray(x).astype(d) for x, d in zip(u_leaves, dtypes)])
    tangents.append(jvp(u).astype(dtype))
  curved = [kind.output_hvp(outputs, t).astype(dtype) for t in tangents]
  c = jnp.stack([jnp.stack([jnp.vdot(ti, hj) for hj in curved]) for ti in tangents])
  # H is symmetric, so C is too up to rounding; make it exactly so for the solve.
  return 0.5 * (c + c.T)


def _safe_divide(x, y):
  """``x / y`` where ``y > 0``, else 0 (with no NaN in either branch)."""
  ok = y > 0
  return jnp.where(ok, x / jnp.where(ok, y, 1), 0)


def step_coefficients(
  c: jax.Array, b: jax.Array, *, rcond: float | None = None
) -> tuple[jax.Array, jax.Array]:
  """Minimizes ``M(x) = 1/2 x^T C x + b^T x`` over one or two coefficients.

  The 2x2 system is solved after scaling ``C`` to unit diagonal, so its
  conditioning is judged by ``1 - r^2`` with ``r = C_12 / sqrt(C_11 C_22)``
  the cosine between the two vectors in the ``C`` metric, whatever their
  lengths. It falls back to the 1-D solve along the first vector (second
  coefficient 0) when ``C_22 <= 0`` (a zero previous update on the first
  step), when ``1 - r^2 <= rcond`` (which also catches an indefinite ``C``)
  or when anything is not finite. When the 1-D problem is not
  positive-definite or not finite either, the result is zeros.

  Args:
    c: the *damped* ``(2, 2)`` or ``(1, 1)`` matrix ``C_ij = u_i^T (F +
      lambda I) u_j``.
    b: ``(2,)`` or ``(1,)``, ``b_i = grad^T u_i``.
    rcond: the smallest ``1 - r^2`` solved in 2-D; default ``sqrt(eps)`` of
      the working dtype (the entries of ``C`` carry rounding errors of a few
      ``eps``, so below that the second coefficient is mostly noise).

  Returns:
    ``(x, predicted)``: the coefficients, shaped like ``b``, and the model's
    change ``M(x) = 1/2 b^T x`` at them (``<= 0``; 0 when the step is zero).
    Both finite, in at least float32.
  """
  c = jnp.asarray(c)
  b = jnp.asarray(b)
  k = b.shape[-1] if b.ndim == 1 else None
  if k not in (1, 2) or c.shape != (k, k):
    raise ValueError(
      f"step_coefficients needs c of shape (k, k) and b of shape (k,), k in (1, 2); "
      f"got {c.shape} and {b.shape}"
    )
  dtype = jnp.promote_types(jnp.result_type(c, b), jnp.float32)
  c = c.astype(dtype)
  b = b.astype(dtype)
  if rcond is None:
    rcond = float(np.finfo(dtype).eps) ** 0.5

  # 1-D: the minimum along the first vector.
  c11, b1 = c[0, 0], b[0]
  ok1 = jnp.isfinite(c11) & jnp.isfinite(b1) & (c11 > 0)
  alpha = _safe_divide(-b1, jnp.where(ok1, c11, 0))
  pred1 = 0.5 * b1 * alpha
  ok1 = ok1 & jnp.isfinite(alpha) & jnp.isfinite(pred1)
  x1 = jnp.zeros_like(b).at[0].set(jnp.where(ok1, alpha, 0))
  pred1 = jnp.where(ok1, pred1, 0)
  if k == 1:
    return x1, pred1

  # 2-D on the unit-diagonal system S C S y = -S b, x = S y, S = diag(1 / sqrt(C_ii)).
  finite = jnp.all(jnp.isfinite(c)) & jnp.all(jnp.isfinite(b))
  diag = jnp.diagonal(c)
  positive = jnp.all(diag > 0)
  s = jnp.where(positive & finite, jax.lax.rsqrt(jnp.where(diag > 0, diag, 1)), 0)
  r = c[0, 1] * s[0] * s[1]
  det = 1 - jnp.square(r)
  ok2 = finite & positive & (det > rcond)
  bs = b * s
  y = _safe_divide(jnp.stack([r * bs[1] - bs[0], r * bs[0] - bs[1]]), jnp.where(ok2, det, 0))
  x2 = y * s
  pred2 = 0.5 * jnp.dot(b, x2)
  ok2 = ok2 & jnp.all(jnp.isfinite(x2)) & jnp.isfinite(pred2)
  x = jnp.where(ok2, x2, x1)
  predicted = jnp.where(ok2, pred2, pred1)
  return x, predicted
