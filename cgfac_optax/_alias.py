"""``cgfac``: the CG-FAC optimizer, ready to use."""

from __future__ import annotations

import numbers

import jax
import optax

from cgfac_optax import _control
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._options import CGSkip, CurvatureDtype, Fallback, Preconditioner, SolverOption
from cgfac_optax._solvers._base import MatmulPrecision
from cgfac_optax._transform import scale_by_cgfac

_MOMENTUM = 0.9
_KL_CLIP = 1e-3

# The defaults of each mode: with a fixed learning rate, the paper's batch-only matrix-free CG;
# with step sizes from the quadratic model, what the time-to-target benchmark found fastest
# (README, "Performance").
FIXED_RATE_DEFAULTS = {
  "damping": 1e-3,
  "solver": "cg",
  "max_iters": 10,
  "curvature_decay": 0.0,
  "refresh_every": 1,
  "curvature_batch_size": None,
}
ADAPTIVE_DEFAULTS = {
  "damping": AdaptiveDamping(initial=1e-2, minimum=1e-5),
  "solver": "pcg",
  "max_iters": 1,
  "curvature_decay": 0.95,
  "refresh_every": 20,
  "curvature_batch_size": 512,
}


def cgfac(
  learning_rate: float | jax.Array | optax.Schedule | None = None,
  damping: float | jax.Array | optax.Schedule | AdaptiveDamping | None = None,
  *,
  momentum: float | jax.Array | None = _MOMENTUM,
  nesterov: bool = False,
  kl_clip: float | jax.Array | None = _KL_CLIP,
  max_iters: int | None = None,
  tol: float = 1e-3,
  solver: SolverOption | None = None,
  warm_start: bool = True,
  curvature_batch_size: int | None | str = "default",
  preconditioner: Preconditioner | None = None,
  fallback: Fallback = "diagonal",
  fallback_decay: float | jax.Array = 0.95,
  curvature_decay: float | jax.Array | None = None,
  refresh_every: int | None = None,
  sketch_rank: int | None = None,
  precision: MatmulPrecision | None = None,
  curvature_dtype: CurvatureDtype | None = None,
  cg_skip: CGSkip | None = None,
) -> optax.GradientTransformationExtraArgs:
  """CG-FAC: K-FAC natural-gradient steps, the damped Kronecker systems solved per layer.

  Two modes, each with the defaults that suit it:

  - ``cgfac()`` (``learning_rate=None``): the step size and the momentum come
    from the local quadratic model (``scale_by_cgfac(adaptive_step=True)``,
    Martens & Grosse 2015, sec. 7), with curvature memory and
    Levenberg-Marquardt damping; ``update`` then takes ``curvature_model=``
    (:class:`CurvatureModel`, e.g. from ``cgfac_optax.flax.curvature_model``)
    and, for the default adaptive damping, ``value=`` and ``value_fn=``.
    ``momentum`` and ``kl_clip`` are left unset (they belong to a fixed
    learning rate). The chain is ``optax.chain(scale_by_cgfac(...,
    adaptive_step=True), optax.scale(-1))``. Defaults (the settings the
    time-to-target benchmark found fastest on its autoencoder; its latest
    30-s tuning preferred ``max_iters=2``, which over 120 s trained no
    better and cost more per step, see the README's "Performance"):
    ``damping=AdaptiveDamping(initial=1e-2, minimum=1e-5)`` (the floor is
    model-dependent: the benchmark CNN trained best with ``minimum`` from
    ``1e-2`` to ``1e-1``, the benchmark transformer, also a classifier, with
    this default), ``solver="pcg"`` with ``max_iters=1`` (one warm-started
    conjugate-gradient iteration on the averaged factors, preconditioned by
    K-FAC's factored-damping inverses), ``curvature_decay=0.95``,
    ``refresh_every=20``, ``curvature_batch_size=512``.
  - ``cgfac(learning_rate)``: ``optax.chain(scale_by_cgfac(damping,
    learning_rate=learning_rate, kl_clip=kl_clip, ...), optax.trace(momentum),
    optax.scale_by_learning_rate(learning_rate))``, KL clipping on by default
    (kfac-pytorch's default bound) so a too-large learning rate shortens the
    steps instead of diverging. Defaults: the paper's CG-FAC, ``damping=1e-3``,
    ``solver="cg"`` (matrix-free CG on each batch's curvature),
    ``max_iters=10``, ``curvature_decay=0``, ``refresh_every=1``, ``curvature_batch_size=None``.

  Both chains hold the state ``optax.chain`` would, but a step that
  ``scale_by_cgfac`` skips as a whole (see its docstring) leaves the later
  transformations' state, the momentum trace included, unchanged.

  Any option passed explicitly overrides its mode's default.

  Args:
    learning_rate: a float, an ``optax.Schedule``, or ``None`` for step sizes
      from the quadratic model.
    damping: Tikhonov damping ``gamma`` added to each layer's Fisher block: a
      float, a schedule, or :class:`AdaptiveDamping` (then ``update`` also
      takes ``value=`` and ``value_fn=``, see :func:`scale_by_cgfac`); ``None``
      for the mode's default.
    momentum: heavy-ball momentum on the preconditioned gradient, in
      ``[0, 1)``; ``None`` or 0 for none. A step that ``scale_by_cgfac`` skips
      as a whole does not reach the momentum (see :func:`scale_by_cgfac`).
    nesterov: use Nesterov momentum.
    kl_clip: bound ``kappa`` on ``learning_rate^2 <x, F x>`` of each
      preconditioned step ``x`` (before momentum); ``None`` turns clipping off.
    max_iters: see :func:`scale_by_cgfac`; ``None`` for the mode's default.
    tol: see :func:`scale_by_cgfac`.
    solver: see :func:`scale_by_cgfac`; ``None`` for the mode's default.
    warm_start: see :func:`scale_by_cgfac`.
    curvature_batch_size: see :func:`scale_by_cgfac`; ``"default"`` for the
      mode's default.
    preconditioner: see :func:`scale_by_cgfac`.
    fallback: see :func:`scale_by_cgfac`.
    fallback_decay: see :func:`scale_by_cgfac`.
    curvature_decay: see :func:`scale_by_cgfac`; ``None`` for the mode's default.
    refresh_every: see :func:`scale_by_cgfac`; ``None`` for the mode's default.
    sketch_rank: see :func:`scale_by_cgfac`.
    precision: see :func:`scale_by_cgfac`; ``None`` for the platform's default.
    curvature_dtype: see :func:`scale_by_cgfac`.
    cg_skip: see :func:`scale_by_cgfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``layer_stats=`` (and the extra arguments of the mode).

  Examples:
    >>> import cgfac_optax as cgfac
    >>> tx = cgfac.cgfac()  # step sizes, momentum and damping adapted
    >>> tx = cgfac.cgfac(learning_rate=0.1, damping=1e-3, max_iters=5)  # the paper's CG-FAC
  """
  # The options are spelled out (no **kwargs) so that optax.inject_hyperparams can bind them, and
  # momentum is tested without bool(): under inject_hyperparams it arrives as a traced array.
  adaptive_step = learning_rate is None
  defaults = ADAPTIVE_DEFAULTS if adaptive_step else FIXED_RATE_DEFAULTS
  pick = lambda value, name: defaults[name] if value is None else value
  if isinstance(curvature_batch_size, str):
    if curvature_batch_size != "default":
      raise ValueError(
        f"curvature_batch_size must be None, an int >= 1 or 'default', got {curvature_batch_size!r}"
      )
    curvature_batch_size = defaults["curvature_batch_size"]
  if isinstance(momentum, bool) or (isinstance(momentum, numbers.Real) and not 0 <= momentum < 1):
    raise ValueError(f"momentum must be None or a float in [0, 1), got {momentum!r}")
  no_momentum = momentum is None or (isinstance(momentum, numbers.Real) and momentum == 0)
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
      pick(damping, "damping"),
      learning_rate=learning_rate,
      kl_clip=kl_clip,
      max_iters=pick(max_iters, "max_iters"),
      tol=tol,
      solver=pick(solver, "solver"),
      warm_start=warm_start,
      curvature_batch_size=curvature_batch_size,
      preconditioner=preconditioner,
      fallback=fallback,
      fallback_decay=fallback_decay,
      curvature_decay=pick(curvature_decay, "curvature_decay"),
      refresh_every=pick(refresh_every, "refresh_every"),
      sketch_rank=sketch_rank,
      adaptive_step=adaptive_step,
      precision=precision,
      curvature_dtype=curvature_dtype,
      cg_skip=cg_skip,
    )
  ]
  if adaptive_step:
    return _control.chain(*parts, optax.scale(-1.0))
  if not no_momentum:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _control.chain(*parts, momentum=None if no_momentum else momentum)
