"""``cgfac``: the CG-FAC optimizer, ready to use."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import optax

from cgfac_optax import _control, _modes, _options
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._modes import ADAPTIVE_DEFAULTS, FIXED_RATE_DEFAULTS, KL_CLIP, MOMENTUM, UNSET
from cgfac_optax._options import (
  CGSkip,
  CurvatureDtype,
  Fallback,
  Preconditioner,
  SolverOption,
  WeightSharing,
)
from cgfac_optax._solvers._base import MatmulPrecision
from cgfac_optax._transform import scale_by_cgfac

__all__ = ["ADAPTIVE_DEFAULTS", "FIXED_RATE_DEFAULTS", "cgfac"]


def _check_step_options(learning_rate, momentum, nesterov, kl_clip) -> None:
  """Refuses the options of a fixed learning rate that would do nothing, naming those passed."""
  options = (("momentum", momentum, MOMENTUM), ("nesterov", nesterov, UNSET))
  options += (("kl_clip", kl_clip, KL_CLIP),)
  passed = {n: v for n, v, default in options if _modes.passed(v, default)}
  if learning_rate is None and passed:
    listed = ", ".join(f"{n}={v!r}" for n, v in passed.items())
    does, them = ("does", "it") if len(passed) == 1 else ("do", "them")
    raise ValueError(
      "cgfac(learning_rate=None) takes the step size and momentum from the quadratic model, "
      f"where {listed} {does} nothing: leave {them} unset, or pass a learning_rate for "
      "fixed-rate steps with momentum and KL clipping"
    )
  if isinstance(momentum, bool) or (isinstance(momentum, numbers.Real) and not 0 <= momentum < 1):
    raise ValueError(f"momentum must be None or a float in [0, 1), got {momentum!r}")
  if nesterov is not UNSET and nesterov and _no_momentum(momentum):
    raise ValueError(
      f"nesterov=True does nothing without momentum (momentum={momentum!r}): leave nesterov "
      "unset, or pass momentum in (0, 1)"
    )


def _no_momentum(momentum) -> bool:
  return momentum is None or (isinstance(momentum, numbers.Real) and momentum == 0)


def cgfac(
  learning_rate: float | jax.Array | optax.Schedule | None = None,
  damping: float | jax.Array | optax.Schedule | AdaptiveDamping | None = None,
  *,
  momentum: float | jax.Array | None = MOMENTUM,
  nesterov: bool = UNSET,
  kl_clip: float | jax.Array | None = KL_CLIP,
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
  memory_limit: int | None = None,
  precision: MatmulPrecision | None = None,
  curvature_dtype: CurvatureDtype | None = None,
  cg_skip: CGSkip | None = None,
  curvature_every: int | None = None,
  weight_sharing: WeightSharing | None = None,
) -> optax.GradientTransformationExtraArgs:
  """CG-FAC: K-FAC natural-gradient steps, the damped Kronecker systems solved per layer.

  Two modes, each with the defaults that suit it; an option passed explicitly
  overrides its mode's default, and one that would do nothing in the mode is
  refused. The options shared with :func:`scale_by_cgfac` are documented there.

  - ``cgfac()`` (``learning_rate=None``): the step size and the momentum come
    from the local quadratic model (``scale_by_cgfac(adaptive_step=True)``,
    Martens & Grosse 2015, sec. 7), with curvature memory and
    Levenberg-Marquardt damping. The chain is ``optax.chain(scale_by_cgfac(...,
    adaptive_step=True), optax.scale(-1))``. ``update`` takes ``params``,
    ``layer_stats=``, ``curvature_model=`` and, for adaptive damping,
    ``value=`` and ``value_fn=``: the helpers return them all, e.g. ``loss,
    grads, extra = cgfac_optax.flax.value_grad_and_extra(model,
    loss=...)(params, x, y, key)``, then ``tx.update(grads, state, params,
    **extra)``. Defaults: ``damping=AdaptiveDamping(initial=1e-2,
    minimum=1e-5)``, ``max_iters=1`` (one warm-started iteration),
    ``curvature_decay=0.95``, ``refresh_every=20``, ``curvature_every=10``,
    ``weight_sharing="auto"`` (``"expand"`` when the model's outputs keep
    positions, as a language model's do, else ``"reduce"``),
    ``curvature_batch_size=None`` (the stats as
    given: the helpers' ``curvature_batch_size`` chooses the examples),
    ``solver="auto_memory"`` (per layer, ``"pcg"`` where its memory fits
    ``memory_limit``, else ``"sketch"``).
  - ``cgfac(learning_rate)``: ``optax.chain(scale_by_cgfac(damping,
    learning_rate=learning_rate, kl_clip=kl_clip, ...), optax.trace(momentum),
    optax.scale_by_learning_rate(learning_rate))``, KL clipping on by default
    so that a too-large learning rate shortens the steps instead of
    diverging. Defaults: ``damping=1e-3``, ``momentum=0.9``,
    ``kl_clip=1e-3`` (kfac-pytorch's bound), ``max_iters=10``,
    ``curvature_decay=0``, ``refresh_every=1``, ``curvature_batch_size=None``,
    ``curvature_every=1``, ``weight_sharing="expand"``, ``solver="auto"`` (per
    layer, the cheapest exact solver whose memory fits).

  In either mode the default solver follows the curvature: ``"auto"`` when
  ``curvature_decay=0`` and ``refresh_every=1`` (batch-only), else
  ``"auto_memory"``; :func:`cgfac_optax.plan` takes the same options and
  shows what each layer runs. Both chains hold the state ``optax.chain``
  would, but a step that ``scale_by_cgfac`` skips as a whole (see its
  docstring) leaves the later transformations' state, the momentum trace
  included, unchanged.

  Args:
    learning_rate: a float, an ``optax.Schedule``, or ``None`` for step sizes
      from the quadratic model.
    damping: see :func:`scale_by_cgfac`; ``None`` for the mode's default.
    momentum: fixed-rate mode: heavy-ball momentum on the preconditioned
      gradient, in ``[0, 1)``; ``None`` or 0 for none.
    nesterov: fixed-rate mode, with momentum: use Nesterov momentum.
    kl_clip: fixed-rate mode: see :func:`scale_by_cgfac`; ``None`` turns
      clipping off.
    max_iters, solver, curvature_decay, refresh_every, curvature_every,
      weight_sharing: see :func:`scale_by_cgfac`; ``None`` for the mode's
      default.
    curvature_batch_size: see :func:`scale_by_cgfac`; ``"default"`` for the
      mode's default.
    tol, warm_start, preconditioner, fallback, fallback_decay, sketch_rank,
      memory_limit, precision, curvature_dtype, cg_skip: see
      :func:`scale_by_cgfac`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` takes
    ``layer_stats=`` (and the extra arguments of the mode).

  Raises:
    ValueError: for an invalid option, or one passed that does nothing in
      the mode (``momentum``, ``nesterov`` or ``kl_clip`` without a learning
      rate) or with the solvers the ``solver`` option can choose
      (``sketch_rank`` without ``"sketch"``, ``refresh_every`` with a solver
      that refreshes nothing, ``preconditioner`` with one that has its own
      or none, ``curvature_decay > 0`` with one that keeps no memory). Options
      passed as arrays (what ``optax.inject_hyperparams`` makes of numbers)
      are not checked for this.

  Examples:
    >>> import cgfac_optax as cgfac
    >>> tx = cgfac.cgfac()  # step sizes, momentum and damping adapted
    >>> tx = cgfac.cgfac(learning_rate=0.1, damping=1e-3, max_iters=5)  # fixed rate
  """
  # The options are spelled out (no **kwargs) so that optax.inject_hyperparams can bind them;
  # the defaults are markers (UNSET, or a Default float) so that what was passed is known.
  # Momentum is tested without bool(): under inject_hyperparams it arrives as a traced array.
  mode = _modes.resolve(
    learning_rate,
    damping=damping,
    solver=solver,
    max_iters=max_iters,
    curvature_batch_size=curvature_batch_size,
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    curvature_every=curvature_every,
    weight_sharing=weight_sharing,
  )
  _check_step_options(learning_rate, momentum, nesterov, kl_clip)
  _options.check_solver(mode["solver"])
  read = dict(
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    sketch_rank=sketch_rank,
    preconditioner=preconditioner,
  )
  _options.check_read(mode["solver"], read, default=solver is None)
  adaptive_step = learning_rate is None
  kl_clip = None if adaptive_step else kl_clip
  parts = [
    scale_by_cgfac(
      learning_rate=learning_rate,
      kl_clip=kl_clip,
      tol=tol,
      warm_start=warm_start,
      preconditioner=preconditioner,
      fallback=fallback,
      fallback_decay=fallback_decay,
      sketch_rank=sketch_rank,
      memory_limit=memory_limit,
      adaptive_step=adaptive_step,
      precision=precision,
      curvature_dtype=curvature_dtype,
      cg_skip=cg_skip,
      **mode,
    )
  ]
  if adaptive_step:
    return _control.chain(*parts, optax.scale(-1.0))
  return _fixed_rate_chain(parts, learning_rate, momentum, nesterov is not UNSET and nesterov)


def _fixed_rate_chain(parts, learning_rate, momentum, nesterov) -> Any:
  """``scale_by_cgfac``, then momentum (unless none), then the learning rate."""
  if not _no_momentum(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _control.chain(*parts, momentum=None if _no_momentum(momentum) else momentum)
