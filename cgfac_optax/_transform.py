"""``scale_by_cgfac``: the CG-FAC preconditioner as an optax transformation.

An update is a sequence of named stages, each a pure function of what came before:

1. **check** that ``update`` got every extra argument the mode reads (:mod:`._inputs`);
2. **solve** every layer's damped Kronecker system (:func:`._precondition.solve`:
   match stats to layers, build the systems, one batched CG for the iterative ones);
3. **scale**: the step policy's factor on every layer's solution (the KL clip);
4. **write back** the layers' updates and warm starts, and the fallback update of
   the parameters without stats (:func:`._precondition.write_back`);
5. **step**: what the step policy outputs (:mod:`._policy`: the fixed-rate policy of
   :mod:`._fixed_rate` or the quadratic model's of :mod:`._quadratic_step`, chosen
   when the transformation is built);
6. the **next damping** (a schedule's value, or adapted: :mod:`._damping`);
7. the **next state**, or the old one when the whole step is **skipped**: an
   option's traced value was not valid, nothing was left to update, or the step
   was not finite (:func:`_skip_step`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgfac_optax import (
  _control,
  _curvature,
  _fixed_rate,
  _inputs,
  _layers,
  _memory,
  _options,
  _plan,
  _precondition,
  _quadratic_step,
)
from cgfac_optax._control import StepControlState
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._mesh import auto_axes_on_explicit_mesh
from cgfac_optax._options import (
  CGSkip,
  CurvatureDtype,
  Fallback,
  Preconditioner,
  SolverOption,
  WeightSharing,
)
from cgfac_optax._policy import Step, StepInputs, StepPolicy
from cgfac_optax._precondition import Leaves, Preconditioned, Solved, StageOptions
from cgfac_optax._solvers._base import MatmulPrecision


class ScaleByCGFACState(NamedTuple):
  """State of :func:`scale_by_cgfac`: arrays only.

  Attributes:
    count: number of updates so far.
    solution: the last solve's answer per parameter (the warm start of the
      next solve); zeros for parameters without curvature stats.
    iterations: CG iterations of the last solve, per layer path (0 for the
      direct solvers and for layers without stats).
    residual: relative residual ``||b - F x|| / ||b||`` of the last CG solve,
      per layer path (0 for the direct solvers, exact up to rounding; 1 for a
      skipped layer, whose update is zero).
    control: damping, KL-clipping factor and skipped-layer counts
      (:class:`StepControlState`).
    fallback_moment: for ``fallback="diagonal"``, the EMA of squared gradients
      of the parameters without stats (zeros elsewhere), like params; ``None``
      for the other fallbacks.
    curvature: with curvature memory, each factor-based layer's running
      averages of ``A`` and ``G`` and their eigenbasis
      (:class:`~cgfac_optax._memory.LayerMemory`), or with ``"sketch"`` their
      sketches (:class:`~cgfac_optax._solvers.sketch.SketchMemory`); ``None``
      without.
    previous_update: with ``adaptive_step``, the last step ``delta`` (the
      update added to the parameters); ``None`` without.
    coefficients: with ``adaptive_step``, the last ``(alpha, mu)`` the
      quadratic model chose; ``None`` without.
  """

  count: jax.Array  # shape=(), dtype=int32
  solution: optax.Updates  # like params
  iterations: dict[str, jax.Array]  # shape=() each, dtype=int32
  residual: dict[str, jax.Array]  # shape=() each, dtype=float32
  control: StepControlState
  fallback_moment: optax.Updates | None = None  # like params
  curvature: dict[str, Any] | None = None  # per layer path: LayerMemory or SketchMemory
  previous_update: optax.Updates | None = None  # like params
  coefficients: jax.Array | None = None  # shape=(2,), dtype=float32


def _stage_options(o: dict[str, Any]) -> StageOptions:
  """The solver stage's options, from :func:`scale_by_cgfac`'s arguments ``o``."""
  decay, refresh_every = o["curvature_decay"], o["refresh_every"]
  choice = _plan.solver_choice(o["solver"], o["max_iters"], o["memory_limit"], decay, refresh_every)
  memory = _memory.curvature_options(decay, refresh_every, o["sketch_rank"], o["curvature_every"])
  return StageOptions(
    choice=choice,
    reading=_curvature.Reading(o["curvature_batch_size"], o["weight_sharing"], memory),
    max_iters=o["max_iters"],
    tol=o["tol"],
    warm_start=o["warm_start"],
    preconditioner=o["preconditioner"],
    cg_skip=o["cg_skip"],
    precision=o["precision"],
    curvature_dtype=o["curvature_dtype"],
    fallback=o["fallback"],
    fallback_decay=o["fallback_decay"],
    batch_only=_options.batch_only(decay, refresh_every),
  )


def _step_policy(o: dict[str, Any]) -> StepPolicy:
  """The step policy of :func:`scale_by_cgfac`'s arguments ``o``, chosen once."""
  if o["adaptive_step"]:
    return _quadratic_step.POLICY
  adaptive = isinstance(o["damping"], AdaptiveDamping)
  return _fixed_rate.policy(o["learning_rate"], o["kl_clip"], adaptive_damping=adaptive)


def _next_state(
  state: ScaleByCGFACState,
  leaves: Leaves,
  solved: Solved,
  pre: Preconditioned,
  step: Step,
  clip,
  damping: jax.Array,
) -> ScaleByCGFACState:
  """The state after a step taken."""
  written = pre.written
  iterations, residual, skipped = _precondition.layer_records(state, solved, written)
  solution = _precondition.overlay(leaves.warm, [w.solution for w in written])
  moments = None if pre.moments is None else leaves.treedef.unflatten(pre.moments)
  return ScaleByCGFACState(
    count=optax.safe_increment(state.count),
    solution=leaves.treedef.unflatten(solution),
    iterations=iterations,
    residual=residual,
    control=StepControlState(
      damping,
      clip.value().astype(jnp.float32),
      skipped,
      state.control.fallback_skipped + pre.fallback_skipped,
      state.control.skipped_steps,
    ),
    fallback_moment=moments,
    curvature=_precondition.new_memory(state.curvature, solved, written),
    previous_update=step.previous,
    coefficients=step.coefficients,
  )


def _skip_step(good: jax.Array, out: list, new: ScaleByCGFACState, old: ScaleByCGFACState):
  """The step as computed when ``good``, else a zero update and ``old`` but for the counts.

  The counts advance either way (``count``, so that schedules move on; the skip
  counters; the logged CG iterations and residuals). One ``lax.cond`` picks
  either (a select per leaf would cost a kernel per leaf to compile).
  """
  kept = old._replace(
    count=new.count,
    iterations=new.iterations,
    residual=new.residual,
    control=old.control._replace(
      skipped=new.control.skipped, fallback_skipped=new.control.fallback_skipped
    ),
  )
  zeros = [jnp.zeros_like(u) for u in out]
  out, state = jax.lax.cond(good, lambda: (out, new), lambda: (zeros, kept))
  skipped_steps = old.control.skipped_steps + (~good).astype(jnp.int32)
  return out, state._replace(control=state.control._replace(skipped_steps=skipped_steps))


def scale_by_cgfac(
  damping: float | jax.Array | optax.Schedule | AdaptiveDamping,
  *,
  max_iters: int = 10,
  tol: float = 1e-3,
  solver: SolverOption = "cg",
  warm_start: bool = True,
  curvature_batch_size: int | None = None,
  preconditioner: Preconditioner | None = None,
  learning_rate: float | jax.Array | optax.Schedule | None = None,
  kl_clip: float | jax.Array | None = None,
  fallback: Fallback = "diagonal",
  fallback_decay: float | jax.Array = 0.95,
  curvature_decay: float | jax.Array = 0.0,
  refresh_every: int = 1,
  sketch_rank: int | None = None,
  memory_limit: int | None = None,
  adaptive_step: bool = False,
  precision: MatmulPrecision | None = None,
  curvature_dtype: CurvatureDtype | None = None,
  cg_skip: CGSkip | None = None,
  curvature_every: int | None = None,
  weight_sharing: WeightSharing = "expand",
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients by the damped K-FAC Fisher, solved per layer.

  For each layer with curvature stats ``a`` (inputs) and ``g`` (per-example
  output gradients), the update is the solution of

  .. math::

    (A \otimes G + \gamma I)\, x = \nabla_W L,
    \quad A = \tfrac{1}{\text{rows}} a^\top a,\ G = \tfrac{1}{B} g^\top g,

  by default found by conjugate gradient with the matrix-free product
  ``A V G = a^T ((a V) g^T) g / (rows B)`` (``solver="cg"``), never forming
  ``A``, ``G`` or the Fisher, starting from the previous step's solution; the
  iterative solvers of all layers run in one ``lax.while_loop``. The update has
  the sign of the gradient; chain a negative learning rate after it
  (:func:`cgfac` does, and documents the two ways of taking a step). Parameters
  that are not the ``kernel`` or ``bias`` of a layer with stats (LayerNorm
  scales, embeddings, ...) get the ``fallback`` update.

  **Non-finite values never leave it.** A layer whose gradient or stats hold a
  NaN or an infinity, whose solve or curvature memory is not finite, or whose
  update does not fit the parameter dtype is *skipped*: its update is zero,
  its warm start is reset to zero, its memory kept, and
  ``state.control.skipped[path]`` counts it; a parameter without stats whose
  gradient or fallback update is not finite is skipped the same way
  (``state.control.fallback_skipped``). The other parts are updated as usual.
  The *whole step* is skipped (zero update, the state as it was except
  ``count`` and ``state.control.skipped_steps``) when every part was skipped,
  when a traced option's value (damping, ``tol``, learning rate, ...) is not
  valid, or, with ``adaptive_step``, when a gradient or the step is not
  finite; :func:`cgfac` then also keeps its momentum. Right-hand sides are
  scaled by an exact power of two before the solve, so gradients from about
  ``1e-30`` to ``1e30`` are solved as accurately as those near 1. The math runs
  in at least float32 (float16 and bfloat16 inputs are promoted); updates and
  warm starts keep each parameter's dtype.

  Args:
    damping: ``gamma > 0``: a float, an ``optax.Schedule`` of the step count,
      or :class:`AdaptiveDamping` for Levenberg-Marquardt adaptation, which
      measures the loss at a probe point: ``update`` then also takes
      ``value=`` (the loss at ``params`` on this batch) and ``value_fn=``
      (``params -> loss`` on the same batch), the extra arguments ``optax``
      line searches take.
    max_iters: most CG iterations per step.
    tol: CG stops for a layer when ``||r|| <= tol ||grad||``; in ``[0, 1)``.
    solver: per layer, how the system is solved: ``"cg"`` (matrix-free CG,
      the paper), ``"cg_materialized"`` (CG with ``A`` and ``G`` formed once
      per step), ``"pcg"`` (that CG preconditioned by K-FAC's inverses),
      ``"eigh"`` (exact: standard K-FAC with eigendecomposed factors),
      ``"lowrank"`` (exact: thin eigendecomposition from the ``rows x rows``
      Gram matrices), ``"kfac_inverse"`` (K-FAC's factored-damping inverses,
      not exact) or ``"sketch"`` (the same factored-damping solve on
      rank-``sketch_rank`` sketches of the factors with an isotropic tail:
      memory and solve linear in the widths; not exact); or a rule that picks
      one per layer within ``memory_limit``: ``"auto"`` (the cheapest exact
      solver by the cost model, from the stats' rows; batch-only curvature),
      ``"auto_memory"`` (``"pcg"`` where its memory fits, else ``"sketch"``,
      from the parameter shapes); or a dict ``{layer path: either}`` (layers
      not in it use ``"auto"``). :func:`cgfac_optax.plan` shows the choice and
      the costs behind it.
    warm_start: start CG from the previous solution (else from zero).
    curvature_batch_size: use only the first this-many examples of the stats
      for the curvature (the gradient always uses the full batch).
    preconditioner: ``None`` or ``"jacobi"`` (``diag(A (x) G) + gamma``), for
      the CG solvers without a preconditioner of their own (``"cg"``,
      ``"cg_materialized"``).
    learning_rate: the learning rate the chain applies after this
      transformation (a float or schedule of the same step count). Used only by
      ``kl_clip`` and adaptive damping, which need it; the output is not
      scaled by it.
    kl_clip: ``None`` (no clipping) or a bound ``kappa > 0``: every layer's
      solution is scaled by one factor ``c = min(1, sqrt(kappa / (lr^2 sum_l
      <x_l, grad_l>)))``, so that the step ``-lr c x`` has ``lr^2 <c x, F c x>
      <= kappa``, without another curvature product (see
      :mod:`cgfac_optax._clipping`); it acts before any momentum that follows
      in the chain, as kfac-pytorch's ``kl_clip``.
    fallback: the update of parameters without stats: ``"diagonal"`` (damped
      diagonal empirical Fisher, an EMA of ``grad^2`` kept in the state),
      ``"identity"`` (the gradient unchanged) or ``"error"`` (raise, listing
      them); see :mod:`cgfac_optax._fallback`.
    fallback_decay: EMA decay of the ``"diagonal"`` fallback's second moment.
    curvature_decay: decay ``beta`` of the running averages of the factors
      ``A`` and ``G`` kept in the state by the solvers with curvature memory
      (the factor-based ones, and ``"sketch"`` as sketches); ``0`` uses each
      batch's curvature alone. See :mod:`cgfac_optax._memory`.
    refresh_every: for the solvers that compute something from the factors
      (``"eigh"``'s eigenbasis, the inverses of ``"pcg"`` and
      ``"kfac_inverse"``), recompute it on steps ``0, 1, 2, 4, ...`` below
      this, then every this-many steps; ``1`` every step.
    sketch_rank: with ``"sketch"``, the directions ``k`` each factor's sketch
      holds (at most the factor's width; ``None`` for 64); memory ``(k + 1)
      (d_A + d_G)`` per layer, a solve ``8 k d_A d_G`` flops. It sets array
      shapes: a Python int (``static_args`` under ``optax.inject_hyperparams``).
      See :mod:`cgfac_optax._solvers.sketch`.
    memory_limit: bytes of curvature data a layer's solver may hold (``None``
      for ``2**30``). The rules pick within it; a solver named explicitly
      whose memory exceeds it is refused with a ``ValueError`` when traced
      (at ``init`` for a solver that keeps curvature memory), before
      anything is allocated. A Python int, like ``sketch_rank``.
    adaptive_step: choose the step size and momentum from the local quadratic
      model (:mod:`cgfac_optax._quadratic_step`): the output is then the whole
      step ``-delta`` with ``delta = alpha D + mu delta_prev`` (``D`` the
      negated preconditioned gradient), to be negated by the chain with no
      learning rate or momentum after it (:func:`cgfac` does this when its
      ``learning_rate`` is ``None``). ``update`` then also needs ``params``
      and ``curvature_model=`` (:class:`CurvatureModel`), and
      ``learning_rate`` and ``kl_clip`` must be ``None``. Given ``value=``,
      a step along which the undamped model predicts a decrease of more than
      half the loss is shortened to where it predicts exactly half, and
      adaptive damping is raised by one adaptation's factor on that step.
    precision: the matmul precision of the curvature products and solves:
      ``"highest"``, ``"high"`` or ``"default"`` (``jax.lax.Precision``), or
      ``None`` for the platform's default at trace time (``"highest"`` on CPU,
      ``"default"`` on GPU, ``"high"`` on TPU). The solvers take it as an
      argument (:class:`cgfac_optax._solvers._base.Arithmetic`).
    curvature_dtype: ``None`` (the solve's dtype, at least float32) or
      ``"bfloat16"``: the curvature rows, and the factors of the factor-based
      CG operators, are held in bfloat16 and every product with them rounds
      its other operand to bfloat16 and accumulates in float32. The
      factorizations (``"eigh"``'s eigenbases, the inverses of ``"pcg"`` and
      ``"kfac_inverse"``) stay in float32, of factors formed from bfloat16
      rows; ``"lowrank"`` keeps its rows in float32.
    cg_skip: how CG skips the work of a converged layer: ``"mask"`` (its
      products are computed and discarded; no conditional in the loop),
      ``"cond"`` (a ``lax.cond`` per layer and iteration), or ``None`` for the
      platform's default at trace time (``"cond"`` on CPU, ``"mask"`` on GPU
      and TPU); see :func:`cgfac_optax.batched_cg`.
    curvature_every: read the stats, and average them into the curvature
      memory, on steps ``0, T, 2T, ...`` only; the steps between precondition
      with the memory as it is. ``layer_stats`` given as a function (as the
      helpers give it) is then called on those steps only, inside a
      ``lax.cond``, so the pass that computes the stats costs nothing on the
      others. ``T > 1`` needs curvature memory on every layer. A Python int;
      ``None`` reads them on every step.
      See :mod:`cgfac_optax._curvature`.
    weight_sharing: for a layer applied at several positions (stats
      ``(examples, positions..., d)``: convolution patches, tokens):
      ``"expand"`` makes every position a row (``A = a^T a / rows``, ``G =
      g^T g / examples``); ``"reduce"`` makes each example one row, its inputs
      averaged and its output gradients summed over the positions (``A`` and
      ``G`` over ``examples`` rows; Eschenhagen et al. 2023), cheaper, and exact
      where the loss sees the positions through their mean. ``"auto"`` (needs
      ``adaptive_step``): ``"expand"`` when the curvature model's outputs keep
      positions (``(examples, positions..., k)``: a loss per token or pixel),
      else ``"reduce"``, for every layer.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``layer_stats=`` (a pytree mirroring the params down to each layer's
    parameter dict, holding :class:`DenseStats` there), and the extra
    arguments its damping and ``adaptive_step`` read.

  Raises:
    ValueError: for invalid options (at construction); for a solver whose
      memory exceeds ``memory_limit`` (at ``init`` or when traced); at update,
      for mismatched ``layer_stats``, and for missing extra arguments: one
      message names every one missing and the helpers that return them all.

  Examples:
    >>> import jax, jax.numpy as jnp, cgfac_optax as cgfac
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> x = jax.random.normal(jax.random.key(0), (8, 3))
    >>> g = jax.random.normal(jax.random.key(1), (8, 2))
    >>> grads = {"dense": {"kernel": x.T @ g / 8, "bias": g.mean(0)}}
    >>> stats = {"dense": cgfac.DenseStats(inputs=x, output_grads=g)}
    >>> tx = cgfac.scale_by_cgfac(damping=1e-2)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, layer_stats=stats)
    >>> updates["dense"]["kernel"].shape
    (3, 2)

  References:
    Chen, `An iterative K-FAC algorithm for Deep Learning
    <https://arxiv.org/abs/2101.00218>`_, 2021.

    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
  """
  options = dict(locals())  # every argument by name: nothing else is defined yet
  _options.validate(**options)
  options["curvature_every"] = options["curvature_every"] or 1
  stage, policy = _stage_options(options), _step_policy(options)
  needs = _inputs.merge(
    {"layer_stats": "the preconditioner"}, policy.needs, _control.needs(damping)
  )

  def init_fn(params):
    previous_update, coefficients = policy.init(params)
    return ScaleByCGFACState(
      count=jnp.zeros([], jnp.int32),
      control=_control.init(damping, _layers.layer_paths(params)),
      previous_update=previous_update,
      coefficients=coefficients,
      **_precondition.init(params, stage),
    )

  def update_fn(
    updates,
    state,
    params=None,
    *,
    layer_stats=None,
    value=None,
    value_fn=None,
    curvature_model=None,
    **extra_args,
  ):
    del extra_args
    given = dict(params=params, layer_stats=layer_stats, value=value, value_fn=value_fn)
    _inputs.check(needs, dict(given, curvature_model=curvature_model))
    leaves, count = _precondition.flatten(updates, state), state.count
    gamma = _control.damping_now(damping, state.control, count)
    reading = _curvature.resolved(stage.reading, curvature_model, params)
    now = stage._replace(reading=reading)
    solved = _precondition.solve(leaves, layer_stats, state.curvature, gamma, count, now)
    clip = policy.scale(solved, count)
    moments = state.fallback_moment
    pre = _precondition.write_back(solved, clip, leaves, moments, gamma, count, now)
    inputs = StepInputs(solved, pre, leaves, clip, state, gamma, params, value, curvature_model)
    step = policy.step(inputs)
    damping_after = _control.next_damping(
      damping, state.control, count, gamma, step, value, value_fn
    )
    new_state = _next_state(state, leaves, solved, pre, step, clip, damping_after)
    # Every part's update, warm start, moment and memory is finite by construction (zero or
    # kept where not); the whole step is skipped when an option's value is not valid, nothing
    # was left to update, the policy's step may not be taken, or the damping is not finite.
    options_ok = _control.traced_options_ok(
      damping=gamma, tol=tol, fallback_decay=fallback_decay, curvature_decay=curvature_decay
    )
    good = options_ok & policy.options_ok(count) & ~_precondition.nothing_updated(pre)
    good = good & step.ok & jnp.isfinite(damping_after)
    out, new_state = _skip_step(good, step.out, new_state, state)
    return leaves.treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, auto_axes_on_explicit_mesh(update_fn))
