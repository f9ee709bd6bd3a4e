"""The solver stage of :func:`scale_by_cgfac`: from gradients and stats to preconditioned updates.

Pure stages over the layers with stats, each taking what the one before returned:

1. **match** the stats to the gradients' kernels and biases (:mod:`._layers`);
2. **build** each layer's damped system: its solver (chosen per layer by
   :func:`cgfac_optax._plan.choose` and refused if its memory does not fit), the
   solver's curvature data (:mod:`._memory`), and the right-hand side and warm
   start scaled by an exact power of two (:mod:`._finite`);
3. **solve** every system: the iterative ones together in one batched CG
   (:mod:`._cg`), the direct ones by their factorization; then **check** that
   each layer's new curvature memory is finite;
4. **write back** each layer's update (times the step policy's factor, e.g. the
   KL clip) and warm start, zero where not finite;
5. the **fallback** update of every parameter without stats (:mod:`._fallback`).

:func:`solve` runs 1-3 and :func:`write_back` 4-5; the step policy (:mod:`._policy`)
computes its factor from the solutions in between.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cgfac_optax import _curvature, _fallback, _finite, _layers, _memory, _plan
from cgfac_optax._cg import batched_cg
from cgfac_optax._clipping import ScaledSum
from cgfac_optax._layers import Layer, LayerShape
from cgfac_optax._solvers import SOLVERS, Solver
from cgfac_optax._solvers._base import arithmetic_for


class StageOptions(NamedTuple):
  """The solver stage's options, fixed when the transformation is built."""

  choice: _plan.SolverChoice
  reading: _curvature.Reading  # curvature_batch_size, weight_sharing, memory options
  max_iters: Any
  tol: Any
  warm_start: bool
  preconditioner: str | None
  cg_skip: str | None
  precision: str | None
  curvature_dtype: str | None
  fallback: str
  fallback_decay: Any
  batch_only: bool  # no layer keeps curvature memory (the options say so as Python values)


class Leaves(NamedTuple):
  """The gradients and warm starts as flat leaves, by the gradients' paths."""

  paths: list[str]
  grads: list[jax.Array]
  warm: list[jax.Array]
  treedef: Any


class System(NamedTuple):
  """One layer's damped system ``(F + gamma I) x = b``, ready to solve."""

  layer: Layer
  solver: Solver
  data: Any  # the solver's curvature data, damping and arithmetic included
  unit: _finite.UnitSystem  # b and the warm start scaled by 2^-exponent; whether finite
  memory: Any  # the layer's curvature memory after this step, or None


class Solution(NamedTuple):
  """One layer's solution on the scaled system, zero where it was not finite."""

  x: jax.Array  # d_A x d_G
  ok: jax.Array  # shape=(), bool: inputs and solution finite
  iterations: jax.Array  # shape=(), int32 (0 for a direct solver)
  residual: jax.Array  # shape=(), float32 (0 for a direct solver)


class Solved(NamedTuple):
  """Every layer's system and solution, in the order of ``layers``."""

  layers: list[Layer]
  systems: list[System]
  solutions: list[Solution]


class Written(NamedTuple):
  """One layer's leaves after the step, by leaf index."""

  updates: dict[int, jax.Array]
  solution: dict[int, jax.Array]
  skipped: jax.Array  # shape=(), bool


class Preconditioned(NamedTuple):
  """The stage's output: the update by leaf and what the state keeps of it."""

  out: list  # the update by leaf (the gradient's sign), the fallback written in
  written: list[Written]  # by layer
  moments: list | None  # the "diagonal" fallback's moments by leaf after this step
  uncovered: int  # how many leaves take the fallback
  fallback_skipped: jax.Array  # shape=(), int32: how many of them were skipped


def flatten(updates, state) -> Leaves:
  paths, grads, treedef = _layers.leaf_paths(updates)
  return Leaves(paths, grads, treedef.flatten_up_to(state.solution), treedef)


def solve(leaves: Leaves, layer_stats, memory, gamma, count, options: StageOptions) -> Solved:
  """Stages 1-3: match, build and solve every layer's system (module docstring)."""
  layers = _layers.match(leaves.paths, leaves.grads, _curvature.stats_shapes(layer_stats))
  _check_solver_paths(options.choice.option, leaves.paths)
  arithmetic = arithmetic_for(options.precision, options.curvature_dtype, jax.default_backend())
  dtypes = [jnp.promote_types(leaves.grads[layer.kernel].dtype, jnp.float32) for layer in layers]
  methods = [_layer_solver(layer, memory, dtype, options) for layer, dtype in zip(layers, dtypes)]
  curvatures = _curvature.stage(
    layers, methods, layer_stats, memory, gamma, count, dtypes, options.reading, arithmetic
  )
  systems = [
    _build_system(layer, method, curvature, leaves, gamma, options, arithmetic)
    for layer, method, curvature in zip(layers, methods, curvatures)
  ]
  return Solved(layers, systems, _solve_systems(systems, options))


def _layer_solver(layer: Layer, memory, dtype, options: StageOptions) -> Solver:
  """The layer's solver (refused if its memory does not fit), checked against its memory."""
  reading = options.reading
  has_bias = layer.bias is not None
  shape = _layers.shape(layer.stats, has_bias, reading.curvature_batch_size, reading.weight_sharing)
  plan = _plan.choose(options.choice, layer.path, shape, dtype)
  _plan.check_fits(plan)
  method = SOLVERS[plan.solver]
  kept = (memory or {}).get(layer.path)
  if kept is not None and _memory.widths(method, kept) != (shape.d_a, shape.d_g):
    d_a, d_g = _memory.widths(method, kept)
    raise ValueError(
      f"layer {layer.path!r}: curvature memory holds factors of widths {d_a} and {d_g} "
      "(from the kernel's shape at init, outputs on its last axis) but the stats give "
      f"{shape.d_a} and {shape.d_g}; use a batch-only solver for this layer"
    )
  return method


def _build_system(layer, method, curvature, leaves: Leaves, gamma, options, arithmetic) -> System:
  dtype = jnp.promote_types(leaves.grads[layer.kernel].dtype, jnp.float32)
  gamma = jnp.asarray(gamma, dtype)
  start = _layers.as_matrix(leaves.warm, layer, dtype)
  b = _layers.as_matrix(leaves.grads, layer, dtype)
  x0 = start if options.warm_start else jnp.zeros_like(start)
  unit = _finite.unit_system(curvature.ok, b, x0)
  data = method.prepare(curvature.prepared, gamma, arithmetic)
  return System(layer, method, data, unit, curvature.memory)


def _preconditioner(system: System, option):
  """The solver's own preconditioner, else Jacobi when asked for, else none."""
  own, data = system.solver.preconditioner, system.data
  if own is not None:
    return lambda r: own(data, r)
  if option == "jacobi":
    diagonal = system.solver.diagonal(data)
    return lambda r: r / diagonal
  return None


def _solve_systems(systems: list[System], options: StageOptions) -> list[Solution]:
  """All iterative systems in one batched CG, each direct one by itself."""
  iterative = [s for s in systems if s.solver.iterative]
  if iterative:
    result = batched_cg(
      [lambda v, s=s: s.solver.operator(s.data, v) for s in iterative],
      [s.unit.b for s in iterative],
      [s.unit.x0 for s in iterative] if options.warm_start else None,
      max_iters=options.max_iters,
      tol=options.tol,
      preconditioners=[_preconditioner(s, options.preconditioner) for s in iterative],
      skip=options.cg_skip,
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
    iterations, residual = jnp.asarray(iterations, jnp.int32), jnp.asarray(residual, jnp.float32)
    solutions.append(Solution(jnp.where(ok, x, 0), ok, iterations, residual))
  return solutions


def _check_solver_paths(solver, paths: list[str]) -> None:
  if not isinstance(solver, Mapping):
    return
  unknown = sorted(set(solver) - set(_layers.layers_of(paths)))
  if unknown:
    raise ValueError(f"solver names layers the gradients do not have: {unknown}")


def write_back(
  solved: Solved, scale: ScaledSum, leaves: Leaves, moments, gamma, count, options: StageOptions
) -> Preconditioned:
  """Stages 4-5: every layer's update (times ``scale``) and warm start, then the fallback."""
  written = [_write_layer(s, x, scale, leaves) for s, x in zip(solved.systems, solved.solutions)]
  out = overlay(leaves.grads, [w.updates for w in written])
  covered = _layers.covered(solved.layers)
  missing = [i for i in range(len(leaves.grads)) if i not in covered]
  if moments is not None:
    moments = leaves.treedef.flatten_up_to(moments)
  fallback_out, new_moments, skipped = _fallback.updates(
    options.fallback,
    leaves.paths,
    leaves.grads,
    missing,
    moments,
    gamma,
    count,
    options.fallback_decay,
  )
  if moments is not None:
    moments = overlay(moments, [new_moments])
  return Preconditioned(overlay(out, [fallback_out]), written, moments, len(missing), skipped)


def _write_layer(system: System, solution: Solution, scale: ScaledSum, leaves: Leaves) -> Written:
  """The layer's update (scaled) and warm start (unscaled), in the parameters' layout."""
  e, layer = system.unit.exponent, system.layer
  step = _finite.times_pow2(solution.x * scale.mantissa, e + scale.exponent)
  updates, fits = _finite.zero_unless_finite(_layers.from_matrix(leaves.grads, layer, step))
  warm = _layers.from_matrix(leaves.warm, layer, _finite.times_pow2(solution.x, e))
  solution_leaves, _ = _finite.zero_unless_finite(warm)
  return Written(updates, solution_leaves, ~(solution.ok & fits))


def overlay(leaves, parts) -> list:
  """``leaves`` with the ``{index: leaf}`` of each part written over them."""
  out = list(leaves)
  for part in parts:
    for i, leaf in part.items():
      out[i] = leaf
  return out


# What the state keeps of the stage.


def init(params, options: StageOptions) -> dict[str, Any]:
  """The stage's fields of the state: warm starts, per-layer records, moments, memory."""
  paths = _layers.layer_paths(params)
  return dict(
    solution=optax.tree.zeros_like(params),
    iterations={p: jnp.zeros([], jnp.int32) for p in paths},
    residual={p: jnp.zeros([], jnp.float32) for p in paths},
    fallback_moment=_fallback.init(params, options.fallback),
    curvature=None if options.batch_only else _init_memory(params, options),
  )


def _init_memory(params, options: StageOptions) -> dict[str, Any]:
  """Zero curvature memory for every layer whose solver keeps it.

  A layer left to ``"auto"`` gets none (:func:`cgfac_optax._plan.choose` refuses it
  when memory was asked for by value, not when the options are arrays, as under
  ``optax.inject_hyperparams``). The rows are not known yet; the memory of a solver
  that keeps it does not depend on them.
  """
  paths, leaves, _ = _layers.leaf_paths(params)
  leaf = dict(zip(paths, leaves))
  out = {}
  for path in _layers.layer_paths(params):
    if _plan.layer_option(options.choice.option, path) == "auto" and not (
      options.choice.memory_requested
    ):
      continue
    kernel, bias = leaf[_layers.child(path, "kernel")], leaf.get(_layers.child(path, "bias"))
    # A bias has the layer's outputs (several kernel axes for nnx.LinearGeneral and attention).
    d_g = kernel.shape[-1] if bias is None else bias.size
    d_a = kernel.size // d_g + int(bias is not None)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    plan = _plan.choose(options.choice, path, LayerShape(0, d_a, d_g), dtype)
    method = SOLVERS[plan.solver]
    if method.keeps_memory:
      _plan.check_fits(plan)
      out[path] = _memory.init(method, d_a, d_g, dtype, options.reading.options)
  return out


def layer_records(state, solved: Solved, written: list[Written]):
  """The state's per-layer CG iterations, residuals and skip counts after this step."""
  iterations, residual = dict(state.iterations), dict(state.residual)
  skipped = dict(state.control.skipped)
  for layer, x, w in zip(solved.layers, solved.solutions, written):
    iterations[layer.path] = jnp.where(w.skipped, 0, x.iterations)
    residual[layer.path] = jnp.where(w.skipped, 1, x.residual).astype(jnp.float32)
    skipped[layer.path] = skipped[layer.path] + w.skipped.astype(jnp.int32)
  return iterations, residual, skipped


def new_memory(old, solved: Solved, written: list[Written]):
  """The curvature memory after the step; a skipped layer keeps its old memory."""
  if old is None:
    return None
  new = dict(old)
  for s, w in zip(solved.systems, written):
    if s.memory is not None:
      keep = lambda n, o, w=w: jnp.where(w.skipped, o, n)
      new[s.layer.path] = jax.tree.map(keep, s.memory, old[s.layer.path])
  return new


def nothing_updated(pre: Preconditioned) -> jax.Array:
  """Whether every part of the update (each layer, each fallback leaf) was skipped."""
  if not pre.written and not pre.uncovered:
    return jnp.zeros([], bool)
  layers_skipped = jnp.stack([w.skipped for w in pre.written]).all() if pre.written else True
  return layers_skipped & (pre.fallback_skipped == pre.uncovered)
