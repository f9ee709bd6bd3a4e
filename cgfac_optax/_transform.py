"""``scale_by_cgfac``: the CG-FAC preconditioner as an optax transformation.

One update is a short pipeline of named stages over the layers with stats, each
a pure function of the one before:

1. **match** the stats to the gradients' kernels and biases (:mod:`._layers`);
2. **build** each layer's damped system: its solver (:mod:`._solvers`, chosen per
   layer), the solver's curvature data, and the right-hand side and warm start
   scaled by an exact power of two (:mod:`._finite`);
3. **solve** every system: the iterative ones together in one batched CG
   (:mod:`._cg`), the direct ones by their factorization;
4. **clip** all layers' steps by one KL factor (:mod:`._clipping`);
5. **write back** each layer's update and warm start, zero where not finite;
6. the **fallback** update of every parameter without stats (:mod:`._fallback`);
7. the **next damping** (a schedule's value, or adapted: :mod:`._damping`);
8. **skip** the whole step when an option's value is not valid or nothing was
   left to update (:func:`_skip_step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgfac_optax import (
  _clipping,
  _control,
  _damping,
  _fallback,
  _finite,
  _layers,
  _memory,
  _options,
  _plan,
  _quadratic,
)
from cgfac_optax._cg import batched_cg
from cgfac_optax._clipping import ScaledSum
from cgfac_optax._control import StepControlState
from cgfac_optax._damping import AdaptiveDamping
from cgfac_optax._layers import Layer
from cgfac_optax._mesh import auto_axes_on_explicit_mesh
from cgfac_optax._options import CGSkip, CurvatureDtype, Fallback, Preconditioner, SolverOption
from cgfac_optax._solvers import SOLVERS, Solver, sketch
from cgfac_optax._solvers._base import Arithmetic, FactorCurvature, MatmulPrecision, arithmetic_for
from cgfac_optax._solvers._base import factors as _factors


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


class _System(NamedTuple):
  """One layer's damped system ``(F + gamma I) x = b``, ready to solve."""

  layer: Layer
  solver: Solver
  data: Any  # the solver's curvature data, damping included
  unit: _finite.UnitSystem  # b and the warm start scaled by 2^-exponent; whether finite
  memory: _memory.LayerMemory | None  # the layer's curvature memory after this step


class _Solution(NamedTuple):
  """One layer's solution on the scaled system, zero where it was not finite."""

  x: jax.Array  # d_A x d_G
  ok: jax.Array  # shape=(), bool: inputs and solution finite
  iterations: jax.Array  # shape=(), int32 (0 for a direct solver)
  residual: jax.Array  # shape=(), float32 (0 for a direct solver)


class _Written(NamedTuple):
  """One layer's leaves after the step, by leaf index."""

  updates: dict[int, jax.Array]
  solution: dict[int, jax.Array]
  skipped: jax.Array  # shape=(), bool


def _curvature(
  method: Solver,
  rows,
  memory,
  damping,
  count,
  arithmetic: Arithmetic,
  *,
  curvature_decay,
  refresh_every,
  sketch_rank,
):
  """What the solver prepares from, and the layer's memory after this step."""
  if method.curvature == "rows" or memory is None:
    curvature = _memory.batch_curvature(
      method, rows, damping, sketch_rank=sketch_rank, arithmetic=arithmetic
    )
    return curvature, None
  if method.curvature == "sketch":
    memory = _memory.update_sketch(memory, rows, curvature_decay, count, arithmetic)
    return memory, memory
  memory = _memory.update(
    memory,
    _factors(rows, arithmetic),
    damping,
    count,
    decay=curvature_decay,
    refresh_every=refresh_every,
    refresh=method.refresh,
  )
  return FactorCurvature(*memory), memory


def _build_system(
  layer,
  grads,
  warm,
  gamma,
  memory,
  count,
  arithmetic: Arithmetic,
  *,
  solver,
  curvature_batch_size,
  max_iters,
  warm_start,
  curvature_decay,
  refresh_every,
  sketch_rank,
) -> _System:
  dtype = jnp.promote_types(grads[layer.kernel].dtype, jnp.float32)
  has_bias = layer.bias is not None
  rows = _layers.curvature_rows(layer.stats, has_bias, curvature_batch_size, dtype)
  shape = _layers.shape(layer.stats, has_bias, curvature_batch_size)
  method = SOLVERS[_plan.layer_solver(solver, layer.path, shape, dtype, max_iters)]
  if memory is not None and _memory.widths(memory) != (shape.d_a, shape.d_g):
    raise ValueError(
      f"layer {layer.path!r}: curvature memory holds factors of widths "
      f"{_memory.widths(memory)[0]} and {_memory.widths(memory)[1]} (from the kernel's "
      f"shape at init, outputs on its last axis) but the stats give {shape.d_a} and "
      f"{shape.d_g}; use a batch-only solver for this layer"
    )
  gamma = jnp.asarray(gamma, dtype)
  curvature, memory = _curvature(
    method,
    rows,
    memory,
    gamma,
    count,
    arithmetic,
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    sketch_rank=sketch_rank,
  )
  start = _layers.as_matrix(warm, layer, dtype)
  unit = _finite.unit_system(
    rows.a,
    rows.g,
    _layers.as_matrix(grads, layer, dtype),
    start if warm_start else jnp.zeros_like(start),
  )
  return _System(layer, method, method.prepare(curvature, gamma, arithmetic), unit, memory)


def _solve(
  systems: list[_System], *, max_iters, tol, preconditioner, warm_start, cg_skip=None
) -> list[_Solution]:
  """Solves every system: all iterative ones in one batched CG, each direct one by itself."""
  iterative = [s for s in systems if s.solver.iterative]
  if iterative:
    precs = [_preconditioner(s, preconditioner) for s in iterative]
    result = batched_cg(
      [lambda v, s=s: s.solver.operator(s.data, v) for s in iterative],
      [s.unit.b for s in iterative],
      [s.unit.x0 for s in iterative] if warm_start else None,
      max_iters=max_iters,
      tol=tol,
      preconditioners=precs,
      skip=cg_skip,
    )
    by_cg = dict(zip(map(id, iterative), zip(result.x, result.iterations, result.residual)))
  solutions = []
  for s in systems:
    if s.solver.iterative:
      x, iterations, residual = by_cg[id(s)]
      ok = s.unit.ok & jnp.isfinite(residual)
    else:
      x, iterations, residual = s.solver.solve(s.data, s.unit.b), 0, 0.0
      ok = s.unit.ok
    ok = ok & _finite.all_finite(x)
    solutions.append(
      _Solution(
        jnp.where(ok, x, 0),
        ok,
        jnp.asarray(iterations, jnp.int32),
        jnp.asarray(residual, jnp.float32),
      )
    )
  return solutions


def _check_memory(system: _System, solution: _Solution) -> _Solution:
  """Skips a layer whose curvature memory would not be finite (stats whose factors overflow).

  A solver solving from stale data (between refreshes) can return a finite answer for such
  a layer; its memory must still not take the step's factors.
  """
  if system.memory is None:
    return solution
  ok = solution.ok & _finite.all_finite(*jax.tree.leaves(system.memory))
  return solution._replace(x=jnp.where(ok, solution.x, 0), ok=ok)


def _preconditioner(system: _System, option):
  """The solver's own preconditioner, else Jacobi when asked for, else none."""
  own, data = system.solver.preconditioner, system.data
  if own is not None:
    return lambda r: own(data, r)
  if option == "jacobi":
    diagonal = system.solver.diagonal(data)
    return lambda r: r / diagonal
  return None


def _x_dot_grad(systems: list[_System], solutions: list[_Solution]) -> ScaledSum:
  return _clipping.x_dot_grad(
    [x.x for x in solutions], [s.unit.b for s in systems], [s.unit.exponent for s in systems]
  )


def _write_back(system: _System, solution: _Solution, clip: ScaledSum, grads, warm) -> _Written:
  """The layer's update (clipped) and warm start (unclipped), in the parameters' layout."""
  e = system.unit.exponent
  step = _finite.times_pow2(solution.x * clip.mantissa, e + clip.exponent)
  updates, fits = _finite.zero_unless_finite(_layers.from_matrix(grads, system.layer, step))
  solution_leaves, _ = _finite.zero_unless_finite(
    _layers.from_matrix(warm, system.layer, _finite.times_pow2(solution.x, e))
  )
  return _Written(updates, solution_leaves, ~(solution.ok & fits))


def _overlay(leaves, parts) -> list:
  """``leaves`` with the ``{index: leaf}`` of each part written over them."""
  out = list(leaves)
  for part in parts:
    for i, leaf in part.items():
      out[i] = leaf
  return out


def _kl_clip(systems, solutions, learning_rate, bound) -> ScaledSum:
  if not systems or bound is None:
    return _clipping.no_clip(jnp.float32)
  return _clipping.kl_clip_factor(_x_dot_grad(systems, solutions), learning_rate, bound)


class _Fallback(NamedTuple):
  """The output leaves with the fallback written in, and what it did."""

  out: list  # the update by leaf, every uncovered leaf's fallback written in
  moments: list | None  # the "diagonal" fallback's moments by leaf after this step
  uncovered: int  # how many leaves take the fallback
  skipped: jax.Array  # shape=(), int32: how many of them were skipped (not finite)


def _fallback_stage(fallback, decay, paths, grads, out, layers, state, gamma, treedef):
  """The updates with every uncovered leaf's fallback written in, and the new moments."""
  covered = _layers.covered(layers)
  missing = [i for i in range(len(grads)) if i not in covered]
  moments = state.fallback_moment
  if moments is not None:
    moments = treedef.flatten_up_to(moments)
  fallback_out, new_moments, skipped = _fallback.updates(
    fallback, paths, grads, missing, moments, gamma, state.count, decay
  )
  if moments is not None:
    moments = _overlay(moments, [new_moments])
  return _Fallback(_overlay(out, [fallback_out]), moments, len(missing), skipped)


def _nothing_updated(written: list[_Written], fallback: _Fallback) -> jax.Array:
  """Whether every part of the update (each layer, each fallback leaf) was skipped."""
  if not written and not fallback.uncovered:
    return jnp.zeros([], bool)
  layers_skipped = jnp.stack([w.skipped for w in written]).all() if written else True
  return layers_skipped & (fallback.skipped == fallback.uncovered)


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


class _Step(NamedTuple):
  """The output leaves and what the next damping and state need of the step taken."""

  out: list  # the transformation's output by leaf (the gradient's sign)
  previous: Any  # the state's previous_update after this step
  coefficients: Any  # the state's coefficients after this step
  predicted: jax.Array | None  # the quadratic model's change along the probed step
  probe: Any  # () -> params at the probed step
  shortened: jax.Array | bool = False  # the step was cut to its bound (raise the damping)


def _fixed_rate_prediction(systems, solutions, learning_rate, clip, damping) -> jax.Array:
  """The quadratic model's change along ``-lr c x`` (see :mod:`cgfac_optax._damping`)."""
  x_sq = _clipping.scaled_sum(
    [jnp.sum(x.x * x.x) for x in solutions], [2 * s.unit.exponent for s in systems]
  )
  step = jnp.asarray(learning_rate, jnp.float32) * clip.value()
  xg = _x_dot_grad(systems, solutions).value()
  return _damping.predicted_change(xg, x_sq.value(), damping, step)


def _probe(params, updates, moved: set[int], learning_rate, treedef):
  """``() -> params - lr * updates`` on the leaves ``moved`` (the adaptive-damping probe point)."""
  param_leaves = treedef.flatten_up_to(params)

  def probe():
    leaves = [
      (p - learning_rate * u).astype(p.dtype) if i in moved else p
      for i, (p, u) in enumerate(zip(param_leaves, updates))
    ]
    return treedef.unflatten(leaves)

  return probe


def _next_damping(damping, state, gamma, step: _Step, value, value_fn, treedef) -> jax.Array:
  """A schedule's value (the last good one if not finite), or the adapted damping.

  Adaptive damping is also raised, by one adaptation's factor, on any step the
  quadratic model's step had to be shortened (:func:`_bounded_by_loss`): the
  model was trusted too far.
  """
  current = jnp.asarray(gamma, jnp.float32)
  current = jnp.where(jnp.isfinite(current), current, state.control.damping)
  if not isinstance(damping, AdaptiveDamping) or step.probe is None:
    return current
  adapted = _control.adapted_damping(
    damping, state.count, current, value, value_fn, step.probe, step.predicted
  )
  raised = jnp.clip(current / damping.factor, damping.minimum, damping.maximum)
  return jnp.where(step.shortened, jnp.maximum(adapted, raised), adapted)


def _layer_records(state, layers, solutions, written):
  """The state's per-layer CG iterations, residuals and skip counts after this step."""
  iterations, residual = dict(state.iterations), dict(state.residual)
  skipped = dict(state.control.skipped)
  for layer, x, w in zip(layers, solutions, written):
    iterations[layer.path] = jnp.where(w.skipped, 0, x.iterations)
    residual[layer.path] = jnp.where(w.skipped, 1, x.residual).astype(jnp.float32)
    skipped[layer.path] = skipped[layer.path] + w.skipped.astype(jnp.int32)
  return iterations, residual, skipped


def _check_curvature_model(params, curvature_model) -> None:
  if params is None or not isinstance(curvature_model, _quadratic.CurvatureModel):
    raise ValueError(
      "adaptive_step needs params and curvature_model=cgfac_optax.CurvatureModel(outputs_fn, "
      "loss): call tx.update(grads, state, params, layer_stats=stats, curvature_model=...), "
      "outputs_fn mapping params to the model's outputs on the batch; "
      f"got params={type(params).__name__}, curvature_model={curvature_model!r}"
    )


# The largest share of the loss one step may be predicted to remove (see _bounded_by_loss).
MAX_PREDICTED_DECREASE = 0.5


def _bounded_by_loss(x, undamped, b, value) -> tuple[jax.Array, jax.Array, jax.Array]:
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


def _quadratic_step(out, grads, previous, params, model, gamma, treedef, value=None) -> _Step:
  """``-delta`` by leaf, ``(alpha, mu)``, the undamped model's change at ``delta``, the probe.

  ``D = -out`` is the preconditioned direction (every parameter, fallback
  included). A non-finite ``D`` or gradient makes the whole step zero. With
  the loss ``value`` the step is never predicted to remove more than half of
  it (:func:`_bounded_by_loss`).
  """
  previous = treedef.flatten_up_to(previous)
  direction = [-u for u in out]
  finite = _finite.all_finite(*direction, *grads, *previous)
  direction = [jnp.where(finite, d, 0) for d in direction]
  previous = [jnp.where(finite, p, 0) for p in previous]
  g = [jnp.where(finite, x, 0) for x in grads]
  vectors = [treedef.unflatten(direction), treedef.unflatten(previous)]
  undamped = _quadratic.gram(model, params, vectors)
  dtype = undamped.dtype
  dot = lambda xs, ys: sum(jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in zip(xs, ys))
  norms = jnp.array(
    [[dot(direction, direction), dot(direction, previous)], [0.0, dot(previous, previous)]]
  )
  norms = norms.at[1, 0].set(norms[0, 1])
  b = jnp.stack([dot(g, direction), dot(g, previous)])
  damped = undamped + jnp.asarray(gamma, dtype) * norms
  x, _ = _quadratic.step_coefficients(damped, b)
  x = jnp.where(finite, x, 0)
  x, predicted, shortened = _bounded_by_loss(x, undamped, b, value)
  delta = [(x[0] * d + x[1] * p).astype(u.dtype) for d, p, u in zip(direction, previous, out)]
  param_leaves = treedef.flatten_up_to(params)
  probe = lambda: treedef.unflatten([(p + d).astype(p.dtype) for p, d in zip(param_leaves, delta)])
  out = [-d for d in delta]
  return _Step(out, treedef.unflatten(delta), x.astype(jnp.float32), predicted, probe, shortened)


def _init_memory(params, solver, requested: bool, sketch_rank: int) -> dict[str, Any]:
  """Zero curvature memory for every layer whose solver uses the factors or their sketches.

  A layer left to "auto" gets none; that is an error when memory was asked for by value (not
  when the options are arrays, as under ``optax.inject_hyperparams``).
  """
  paths, leaves, _ = _layers.leaf_paths(params)
  leaf = dict(zip(paths, leaves))
  out = {}
  for path in _layers.layer_paths(params):
    name = solver.get(path, "auto") if isinstance(solver, Mapping) else solver
    if name == "auto" and not requested:
      continue
    if name == "auto":
      raise ValueError(
        f"curvature memory is allocated at init, before any stats, so layer {path!r} needs "
        f"a named solver, not 'auto': pass solver= one of {list(SOLVERS)} (or a dict by path)"
      )
    method = SOLVERS[name]
    if method.curvature == "rows":
      continue
    kernel, bias = leaf[_layers.child(path, "kernel")], leaf.get(_layers.child(path, "bias"))
    # A bias has the layer's outputs (several kernel axes for nnx.LinearGeneral and attention).
    d_g = kernel.shape[-1] if bias is None else bias.size
    d_a = kernel.size // d_g + int(bias is not None)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    if method.curvature == "sketch":
      out[path] = sketch.init(d_a, d_g, sketch_rank, dtype)
    else:
      out[path] = _memory.init_layer(d_a, d_g, dtype, method.refresh)
  return out


def _new_memory(old, systems: list[_System], written: list[_Written]):
  """The curvature memory after the step; a skipped layer keeps its old memory."""
  if old is None:
    return None
  new = dict(old)
  for s, w in zip(systems, written):
    if s.memory is not None:
      keep = lambda n, o, w=w: jnp.where(w.skipped, o, n)
      new[s.layer.path] = jax.tree.map(keep, s.memory, old[s.layer.path])
  return new


def _check_solver_paths(solver, paths: list[str]) -> None:
  if not isinstance(solver, Mapping):
    return
  unknown = sorted(set(solver) - set(_layers.layers_of(paths)))
  if unknown:
    raise ValueError(f"solver names layers the gradients do not have: {unknown}")


def _check_layer_stats(layer_stats) -> None:
  if layer_stats is None:
    raise ValueError(
      "scale_by_cgfac needs the layers' curvature stats: call "
      "tx.update(grads, state, params, layer_stats=stats), with stats from "
      "cgfac_optax.flax.value_grad_and_stats (Linen), "
      "cgfac_optax.flax.nnx_value_grad_and_stats (NNX), or built by hand as "
      "{layer path: cgfac_optax.DenseStats(inputs, output_grads)}"
    )


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
  adaptive_step: bool = False,
  precision: MatmulPrecision | None = None,
  curvature_dtype: CurvatureDtype | None = None,
  cg_skip: CGSkip | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients by the damped K-FAC Fisher, solved with CG.

  For each layer with curvature stats ``a`` (inputs) and ``g`` (per-example
  output gradients), the update is the solution of

  .. math::

    (A \otimes G + \gamma I)\, x = \nabla_W L,
    \quad A = \tfrac{1}{\text{rows}} a^\top a,\ G = \tfrac{1}{B} g^\top g,

  found by conjugate gradient with the matrix-free product
  ``A V G = a^T ((a V) g^T) g / (rows B)`` (``solver="cg"``), never forming
  ``A``, ``G`` or the Fisher, starting from the previous step's solution. All
  layers are solved in one ``lax.while_loop``. The update has the sign of the
  gradient; chain a negative learning rate after it (:func:`cgfac` does).

  Parameters that are not the ``kernel`` or ``bias`` of a layer with stats
  (LayerNorm scales, embeddings, ...) get the ``fallback`` update.

  **Step control.** With ``kl_clip=kappa`` every layer's solution is scaled by
  one common factor ``c = min(1, sqrt(kappa / (lr^2 sum_l <x_l, grad_l>)))``
  so that the step ``-lr c x`` has ``lr^2 <c x, F c x> <= kappa``, computed
  without another curvature product (``<x, (F + gamma I) x> = <x, grad>`` for
  an exact solve; see :mod:`cgfac_optax._clipping`). The clip acts before any
  momentum that follows in the chain (as kfac-pytorch's ``kl_clip``). With
  ``damping=AdaptiveDamping(...)`` the damping follows the Levenberg-Marquardt
  rule (see :class:`AdaptiveDamping`); ``update`` then also needs ``value=``
  (the loss at ``params`` on this batch) and ``value_fn=`` (``params -> loss``
  on the same batch), the extra arguments ``optax`` line searches take::

    tx = cgfac.cgfac(learning_rate=0.1, damping=cgfac.AdaptiveDamping(initial=1e-2))

    @jax.jit
    def train_step(params, opt_state, batch):
      loss, grads, stats = value_grad_and_stats(params, batch)
      updates, opt_state = tx.update(
        grads, opt_state, params, layer_stats=stats,
        value=loss, value_fn=lambda p: loss_fn(p, batch))
      return optax.apply_updates(params, updates), opt_state, loss

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
    damping: ``gamma > 0``, a float, an ``optax.Schedule`` of the step count,
      or :class:`AdaptiveDamping` options for Levenberg-Marquardt adaptation.
    max_iters: most CG iterations per step.
    tol: CG stops for a layer when ``||r|| <= tol ||grad||``; in ``[0, 1)``.
    solver: ``"cg"`` (matrix-free CG, the paper), ``"cg_materialized"`` (CG
      with ``A`` and ``G`` formed once per step), ``"pcg"`` (that CG
      preconditioned by K-FAC's inverses), ``"eigh"`` (exact: standard
      K-FAC with eigendecomposed factors), ``"lowrank"`` (exact: thin
      eigendecomposition from the ``rows x rows`` Gram matrices),
      ``"kfac_inverse"`` (K-FAC's factored-damping inverses, not exact) or
      ``"sketch"`` (the same factored-damping solve on rank-``sketch_rank``
      sketches of the factors with an isotropic tail: memory and solve
      linear in the widths; not exact); or
      ``"auto"``: per layer, the cheapest exact one by the cost model of
      :func:`cgfac_optax.plan` (which shows the choice); or a dict
      ``{layer path: solver}`` (layers not in it use ``"auto"``).
    warm_start: start CG from the previous solution (else from zero).
    curvature_batch_size: use only the first this-many examples of the stats
      for the curvature (the gradient always uses the full batch).
    preconditioner: ``None`` or ``"jacobi"`` (``diag(A (x) G) + gamma``).
    learning_rate: the learning rate the chain applies after this
      transformation (a float or schedule of the same step count). Used only by
      ``kl_clip`` and adaptive damping, which need it; the output is not
      scaled by it.
    kl_clip: ``None`` (no clipping) or the bound ``kappa > 0`` on
      ``lr^2 <x, F x>`` per step.
    fallback: the update of parameters without stats: ``"diagonal"`` (damped
      diagonal empirical Fisher, an EMA of ``grad^2`` kept in the state),
      ``"identity"`` (the gradient unchanged) or ``"error"`` (raise, listing
      them); see :mod:`cgfac_optax._fallback`.
    fallback_decay: EMA decay of the ``"diagonal"`` fallback's second moment.
    curvature_decay: decay ``beta`` of the running averages of the factors
      ``A`` and ``G`` kept in the state for the factor-based solvers
      (``"cg_materialized"``, ``"eigh"``, ``"pcg"``, ``"kfac_inverse"``) and,
      as sketches, for ``"sketch"``; ``0`` uses each batch's curvature alone.
      See :mod:`cgfac_optax._memory`.
    refresh_every: with ``"eigh"`` and ``"pcg"``, recompute the factors'
      eigenbasis on steps ``0, 1, 2, 4, ...`` below this, then every this-many
      steps; ``1`` decomposes every step.
    sketch_rank: with ``"sketch"``, the directions ``k`` each factor's sketch
      holds (at most the factor's width; ``None`` for 64); memory ``(k + 1)
      (d_A + d_G)`` per layer, a solve ``8 k d_A d_G`` flops. It sets array
      shapes: a Python int (``static_args`` under ``optax.inject_hyperparams``).
      See :mod:`cgfac_optax._solvers.sketch`.
    adaptive_step: choose the step size and momentum from the local quadratic
      model (:mod:`cgfac_optax._quadratic`): the output is then the whole
      step ``-delta`` with ``delta = alpha D + mu delta_prev`` (``D`` the
      negated preconditioned gradient), to be negated by the chain with no
      learning rate or momentum after it (:func:`cgfac` does this when its
      ``learning_rate`` is ``None``). ``update`` then also needs
      ``curvature_model=`` (:class:`CurvatureModel`), and ``learning_rate``
      and ``kl_clip`` must be ``None``. Given ``value=`` (the loss on the
      batch, which adaptive damping needs anyway), a step along which the
      undamped model predicts a decrease of more than half the loss is
      shortened to where it predicts exactly half, and adaptive damping is
      raised by one adaptation's factor on that step.
    precision: the matmul precision of the curvature products and solves:
      ``"highest"``, ``"high"`` or ``"default"`` (``jax.lax.Precision``), or
      ``None`` for the platform's default at trace time (``"highest"`` on CPU,
      ``"default"`` on GPU, ``"high"`` on TPU; see the README's "Precision
      and dtype" for the accuracy of each).
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

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``layer_stats=`` (a pytree mirroring the params down to each layer's
    parameter dict, holding :class:`DenseStats` there), and with adaptive
    damping also ``value=`` and ``value_fn=``.

  Raises:
    ValueError: for invalid options (at construction), for missing or
      mismatched ``layer_stats`` (at update), and for a missing ``value``,
      ``value_fn`` or ``params`` with adaptive damping (at update).

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
  adaptive = isinstance(damping, AdaptiveDamping)
  sketch_rank = sketch.DEFAULT_RANK if sketch_rank is None else sketch_rank
  _options.validate(
    damping=damping,
    adaptive=adaptive,
    max_iters=max_iters,
    tol=tol,
    solver=solver,
    curvature_batch_size=curvature_batch_size,
    preconditioner=preconditioner,
    learning_rate=learning_rate,
    kl_clip=kl_clip,
    fallback=fallback,
    fallback_decay=fallback_decay,
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    sketch_rank=sketch_rank,
    adaptive_step=adaptive_step,
    precision=precision,
    curvature_dtype=curvature_dtype,
    cg_skip=cg_skip,
  )
  build = dict(
    solver=solver,
    curvature_batch_size=curvature_batch_size,
    max_iters=max_iters,
    warm_start=warm_start,
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    sketch_rank=sketch_rank,
  )
  refresh_each_step = _options.is_int(refresh_every) and refresh_every == 1
  batch_only = refresh_each_step and (_options.is_number(curvature_decay) and curvature_decay == 0)
  memory_requested = (_options.is_number(curvature_decay) and curvature_decay > 0) or (
    _options.is_int(refresh_every) and refresh_every > 1
  )

  def init_fn(params):
    paths = _layers.layer_paths(params)
    return ScaleByCGFACState(
      count=jnp.zeros([], jnp.int32),
      solution=optax.tree.zeros_like(params),
      iterations={p: jnp.zeros([], jnp.int32) for p in paths},
      residual={p: jnp.zeros([], jnp.float32) for p in paths},
      control=_control.init(damping, paths),
      fallback_moment=_fallback.init(params, fallback),
      curvature=None if batch_only else _init_memory(params, solver, memory_requested, sketch_rank),
      previous_update=optax.tree.zeros_like(params) if adaptive_step else None,
      coefficients=jnp.zeros([2], jnp.float32) if adaptive_step else None,
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
    _check_layer_stats(layer_stats)
    if adaptive_step:
      _check_curvature_model(params, curvature_model)
    if adaptive:
      _control.check_adaptive_args(params, value, value_fn)
    paths, grads, treedef = _layers.leaf_paths(updates)
    warm = treedef.flatten_up_to(state.solution)
    layers = _layers.match(paths, grads, layer_stats)
    _check_solver_paths(solver, paths)
    gamma = _control.damping_now(damping, state.control, state.count)
    memory = state.curvature or {}

    arithmetic = arithmetic_for(precision, curvature_dtype, jax.default_backend())
    systems = [
      _build_system(
        layer, grads, warm, gamma, memory.get(layer.path), state.count, arithmetic, **build
      )
      for layer in layers
    ]
    solutions = _solve(
      systems,
      max_iters=max_iters,
      tol=tol,
      preconditioner=preconditioner,
      warm_start=warm_start,
      cg_skip=cg_skip,
    )
    solutions = [_check_memory(s, x) for s, x in zip(systems, solutions)]
    lr = _control.at_count(learning_rate, state.count)
    options_ok = _control.traced_options_ok(
      damping=gamma,
      tol=tol,
      learning_rate=lr,
      kl_clip=kl_clip,
      fallback_decay=fallback_decay,
      curvature_decay=curvature_decay,
    )
    clip = _kl_clip(systems, solutions, lr, kl_clip)
    written = [_write_back(s, x, clip, grads, warm) for s, x in zip(systems, solutions)]
    out = _overlay(grads, [w.updates for w in written])
    fallback_step = _fallback_stage(
      fallback, fallback_decay, paths, grads, out, layers, state, gamma, treedef
    )
    out, moments = fallback_step.out, fallback_step.moments
    step = _Step(out, state.previous_update, state.coefficients, None, None)
    if adaptive_step:
      previous = state.previous_update
      step = _quadratic_step(out, grads, previous, params, curvature_model, gamma, treedef, value)
    elif adaptive and layers:
      step = step._replace(
        predicted=_fixed_rate_prediction(systems, solutions, lr, clip, state.control.damping),
        probe=_probe(params, out, _layers.covered(layers), lr, treedef),
      )
    next_damping = _next_damping(damping, state, gamma, step, value, value_fn, treedef)

    iterations, residual, skipped = _layer_records(state, layers, solutions, written)
    new_state = ScaleByCGFACState(
      count=optax.safe_increment(state.count),
      solution=treedef.unflatten(_overlay(warm, [w.solution for w in written])),
      iterations=iterations,
      residual=residual,
      control=StepControlState(
        next_damping,
        clip.value().astype(jnp.float32),
        skipped,
        state.control.fallback_skipped + fallback_step.skipped,
        state.control.skipped_steps,
      ),
      fallback_moment=None if moments is None else treedef.unflatten(moments),
      curvature=_new_memory(state.curvature, systems, written),
      previous_update=step.previous,
      coefficients=step.coefficients,
    )
    # The whole step is skipped when an option's value is not valid or nothing was left to
    # update. Every part's update, warm start, moment and memory is finite by construction
    # (zero or kept where not); with adaptive_step, one step over all parameters from the
    # quadratic model, a non-finite gradient or step skips it, and so does a damping that
    # is not finite.
    good = options_ok & ~_nothing_updated(written, fallback_step)
    if adaptive_step:
      good = good & _finite.all_finite(*grads, *step.out, step.coefficients)
    good = good & jnp.isfinite(next_damping)
    out, new_state = _skip_step(good, step.out, new_state, state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, auto_axes_on_explicit_mesh(update_fn))
