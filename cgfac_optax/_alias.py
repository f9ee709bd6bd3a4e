"""``cgfac``: the CG-FAC optimizer, ready to use."""

from __future__ import annotations

import jax
import optax

from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._options import Fallback, Preconditioner, SolverOption
from cgfac_optax._transform import scale_by_cgfac

_MOMENTUM = 0.9
_KL_CLIP = 1e-3


def cgfac(
  learning_rate: float | jax.Array | optax.Schedule | None,
  damping: float | jax.Array | optax.Schedule | AdaptiveDamping = 1e-3,
  *,
  momentum: float | jax.Array | None = _MOMENTUM,
  nesterov: bool = False,
  kl_clip: float | jax.Array | None = _KL_CLIP,
  max_iters: int = 10,
  tol: float = 1e-3,
  solver: SolverOption = "cg",
  warm_start: bool = True,
  curvature_batch_size: int | None = None,
  preconditioner: Preconditioner | None = None,
  fallback: Fallback = "diagonal",
  fallback_decay: float | jax.Array = 0.95,
  curvature_decay: float | jax.Array = 0.0,
  refresh_every: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """CG-FAC: K-FAC natural-gradient steps solved by conjugate gradient.

  The same as ``optax.chain(scale_by_cgfac(damping, learning_rate=learning_rate,
  kl_clip=kl_clip, ...), optax.trace(momentum),
  optax.scale_by_learning_rate(learning_rate))``: KL clipping is on by default
  (kfac-pytorch's default bound), so a too-large learning rate shortens the
  steps instead of diverging.

  With ``learning_rate=None`` the step size and the momentum come from the
  local quadratic model instead (``scale_by_cgfac(adaptive_step=True)``,
  Martens & Grosse 2015, sec. 7): ``update`` then also takes
  ``curvature_model=`` (:class:`CurvatureModel`), ``momentum`` and ``kl_clip``
  are left unset (they belong to a fixed learning rate), and the chain is
  ``optax.chain(scale_by_cgfac(..., adaptive_step=True), optax.scale(-1))``.

  Args:
    learning_rate: a float, an ``optax.Schedule``, or ``None`` for step sizes
      from the quadratic model.
    damping: Tikhonov damping ``gamma`` added to each layer's Fisher block: a
      float, a schedule, or :class:`AdaptiveDamping` (then ``update`` also
      takes ``value=`` and ``value_fn=``, see :func:`scale_by_cgfac`).
    momentum: heavy-ball momentum on the preconditioned gradient; ``None`` or
      0 for none.
    nesterov: use Nesterov momentum.
    kl_clip: bound ``kappa`` on ``learning_rate^2 <x, F x>`` of each
      preconditioned step ``x`` (before momentum); ``None`` turns clipping off.
    max_iters: see :func:`scale_by_cgfac`.
    tol: see :func:`scale_by_cgfac`.
    solver: see :func:`scale_by_cgfac`.
    warm_start: see :func:`scale_by_cgfac`.
    curvature_batch_size: see :func:`scale_by_cgfac`.
    preconditioner: see :func:`scale_by_cgfac`.
    fallback: see :func:`scale_by_cgfac`.
    fallback_decay: see :func:`scale_by_cgfac`.
    curvature_decay: see :func:`scale_by_cgfac`.
    refresh_every: see :func:`scale_by_cgfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``layer_stats=``.

  Examples:
    >>> import cgfac_optax as cgfac
    >>> tx = cgfac.cgfac(learning_rate=0.1, damping=1e-3, max_iters=5)
  """
  # The options are spelled out (no **kwargs) so that optax.inject_hyperparams can bind them, and
  # momentum is tested without bool(): under inject_hyperparams it arrives as a traced array.
  adaptive_step = learning_rate is None
  no_momentum = momentum is None or (isinstance(momentum, (int, float)) and momentum == 0)
  if adaptive_step:
    # The quadratic model picks both; their fixed-rate defaults stand aside, other values fail.
    if momentum not in (None, _MOMENTUM) or kl_clip not in (None, _KL_CLIP):
      raise ValueError(
        "learning_rate=None chooses the step size and momentum from the quadratic model: "
        f"leave momentum and kl_clip unset, got momentum={momentum!r}, kl_clip={kl_clip!r}"
      )
    kl_clip = None
  parts = [
    scale_by_cgfac(
      damping,
      learning_rate=learning_rate,
      kl_clip=kl_clip,
      max_iters=max_iters,
      tol=tol,
      solver=solver,
      warm_start=warm_start,
      curvature_batch_size=curvature_batch_size,
      preconditioner=preconditioner,
      fallback=fallback,
      fallback_decay=fallback_decay,
      curvature_decay=curvature_decay,
      refresh_every=refresh_every,
      adaptive_step=adaptive_step,
    )
  ]
  if adaptive_step:
    return optax.chain(*parts, optax.scale(-1.0))
  if not no_momentum:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
