r"""Curvature with memory: running averages of the Kronecker factors, and their eigenbases.

One batch's factors ``A_t = s_A a^T a`` and ``G_t = s_G g^T g`` come from a few
hundred rows at most, so for a layer wider than that they are rank-deficient
and every other direction is left to the damping. K-FAC keeps an exponential
moving average of each factor instead,

.. math::

  \bar A_t = \beta_t \bar A_{t-1} + (1 - \beta_t) A_t, \qquad
  \beta_t = \min\big(\beta, \tfrac{t}{t + 1}\big),

(likewise ``G``) where ``t`` counts the steps from 0: the first step takes the
batch factors as they are and the early average is the plain mean of the
factors seen so far, with no bias toward the zero start. The averages live in
the optimizer state as ``d_A x d_A`` and ``d_G x d_G`` arrays, so memory costs
``d_A^2 + d_G^2`` per layer; ``decay = 0`` is the batch-only curvature.

The solvers that compute something from the factors (``"eigh"`` its
eigenbasis, ``"pcg"`` its preconditioner's inverses: the record's
``refresh``) keep it in the state too, refreshed on a schedule: on steps
``0, 1, 2, 4, 8, ...`` below ``refresh_every``, then every ``refresh_every``
steps (a ``lax.cond``, so the other steps decompose nothing). Between
refreshes ``"eigh"`` solves with the stale basis (standard K-FAC's amortized
inverse), while ``"pcg"`` runs CG on the current averages and uses the stale
inverses only as its preconditioner.

The ``"sketch"`` solver keeps the same averages matrix-free instead: a rank-``k``
sketch of each with an isotropic tail, ``O(k d)`` memory, updated every step
from the rows by the same decay rule
(:mod:`cgfac_optax._solvers.sketch`).

Which of these a layer keeps follows from its solver record's ``curvature``
(``"rows"``: nothing; ``"factors"``; ``"sketch"``), through the table
:data:`KINDS`; no code here or in the transformation names a solver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import CurvatureRows
from cgfac_optax._solvers import Solver, sketch
from cgfac_optax._solvers._base import ACCURATE, Arithmetic, FactorCurvature, Factors, factors


class CurvatureOptions(NamedTuple):
  """The options of curvature memory (see :func:`cgfac_optax.scale_by_cgfac`)."""

  decay: Any  # curvature_decay: a float in [0, 1) or a traced array
  refresh_every: Any  # an int >= 1 or a traced array
  sketch_rank: int  # static: it sets the sketches' shapes
  every: int = 1  # curvature_every, static: the stats are read on every this-many-th step


BATCH_ONLY = CurvatureOptions(decay=0.0, refresh_every=1, sketch_rank=sketch.DEFAULT_RANK)


def curvature_options(
  decay, refresh_every, sketch_rank: int | None, every: int = 1
) -> CurvatureOptions:
  """The options of :func:`cgfac_optax.scale_by_cgfac`; ``sketch_rank=None`` is the default rank."""
  rank = sketch.DEFAULT_RANK if sketch_rank is None else sketch_rank
  return CurvatureOptions(decay, refresh_every, rank, every)


class LayerMemory(NamedTuple):
  """What a layer keeps between steps: the averaged factors and the solver's refreshed data."""

  factors: Factors
  refreshed: Any  # the solver's refresh of the factors at the last refresh, or None


def init_layer(d_a: int, d_g: int, dtype, refresh) -> LayerMemory:
  """Zero factors and zero refreshed data (step 0 always refreshes before any use)."""
  f = Factors(jnp.zeros((d_a, d_a), dtype), jnp.zeros((d_g, d_g), dtype))
  refreshed = None
  if refresh is not None:
    shapes = jax.eval_shape(refresh, f, jnp.ones([], dtype))
    refreshed = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  return LayerMemory(f, refreshed)


def decay_at(decay, count: jax.Array, dtype) -> jax.Array:
  """``beta_t = min(beta, t / (t + 1))``: the weight of the old average at step ``t``."""
  t = count.astype(dtype)
  return jnp.minimum(jnp.asarray(decay, dtype), t / (t + 1))


def average(previous: Factors, batch: Factors, decay, count: jax.Array) -> Factors:
  """The running average after this step's factors (the rule in the module docstring)."""
  beta = decay_at(decay, count, batch.a.dtype)
  return Factors(*(beta * p + (1 - beta) * b for p, b in zip(previous, batch)))


def refresh_due(count: jax.Array, refresh_every) -> jax.Array:
  """Steps ``0, 1, 2, 4, ...`` below ``refresh_every``, then every ``refresh_every``-th."""
  power_of_two = (count & (count - 1)) == 0
  return jnp.where(count < refresh_every, power_of_two, count % refresh_every == 0)


# The three kinds of curvature a solver prepares from. Each takes the solver record, so that
# what differs between solvers of one kind (the factor-based ones' refresh) is read from it.


class Kind(NamedTuple):
  """What a layer's curvature of one kind is made of, kept as, and updated by."""

  init: Callable[..., Any]  # (solver, d_a, d_g, dtype, options) -> zero memory, or None
  batch: Callable[..., Any]  # (solver, rows, damping, options, arithmetic) -> curvature
  average: Callable[..., Any]  # (memory, rows, updates, options, arithmetic) -> memory
  refresh: Callable[..., Any]  # (solver, memory, damping) -> memory, its derived data redone
  curvature: Callable[[Any], Any]  # memory -> what the solver's prepare takes
  widths: Callable[[Any], tuple[int, int]]  # memory -> (d_A, d_G) of the factors it averages


def _factors_batch(solver, rows, damping, options, arithmetic) -> FactorCurvature:
  f = factors(rows, arithmetic)
  return FactorCurvature(f, None if solver.refresh is None else solver.refresh(f, damping))


def _factors_average(memory, rows, updates, options, arithmetic) -> LayerMemory:
  new = average(memory.factors, factors(rows, arithmetic), options.decay, updates)
  return memory._replace(factors=new)


def _factors_refresh(solver, memory, damping) -> LayerMemory:
  if solver.refresh is None:
    return memory
  return memory._replace(refreshed=solver.refresh(memory.factors, damping))


def _sketch_batch(solver, rows, damping, options, arithmetic) -> sketch.SketchMemory:
  empty = sketch.init(rows.a.shape[1], rows.g.shape[1], options.sketch_rank, rows.a.dtype)
  return sketch.update_memory(empty, rows, 0.0, arithmetic)


def _sketch_average(memory, rows, updates, options, arithmetic) -> sketch.SketchMemory:
  beta = decay_at(options.decay, updates, memory.a.q.dtype)
  return sketch.update_memory(memory, rows, beta, arithmetic)


KINDS: dict[str, Kind] = {
  "rows": Kind(
    init=lambda solver, d_a, d_g, dtype, options: None,
    batch=lambda solver, rows, damping, options, arithmetic: rows,
    average=None,
    refresh=lambda solver, memory, damping: memory,
    curvature=lambda memory: memory,
    widths=lambda memory: (0, 0),
  ),
  "factors": Kind(
    init=lambda solver, d_a, d_g, dtype, options: init_layer(d_a, d_g, dtype, solver.refresh),
    batch=_factors_batch,
    average=_factors_average,
    refresh=_factors_refresh,
    curvature=lambda memory: FactorCurvature(*memory),
    widths=lambda memory: (memory.factors.a.shape[0], memory.factors.g.shape[0]),
  ),
  "sketch": Kind(
    init=lambda solver, d_a, d_g, dtype, options: sketch.init(d_a, d_g, options.sketch_rank, dtype),
    batch=_sketch_batch,
    average=_sketch_average,
    refresh=lambda solver, memory, damping: memory,
    curvature=lambda memory: memory,
    widths=lambda memory: (memory.a.q.shape[0], memory.g.q.shape[0]),
  ),
}


def refreshes(solver: Solver) -> bool:
  """Whether ``solver`` keeps data derived from its memory that a refresh recomputes."""
  return solver.refresh is not None


def init(solver: Solver, d_a: int, d_g: int, dtype, options: CurvatureOptions) -> Any:
  """A layer's zero curvature memory for ``solver``; ``None`` if it keeps none."""
  return KINDS[solver.curvature].init(solver, d_a, d_g, dtype, options)


def widths(solver: Solver, memory) -> tuple[int, int]:
  """``(d_A, d_G)`` of the factors a layer's memory averages."""
  return KINDS[solver.curvature].widths(memory)


def batch_curvature(
  solver: Solver,
  rows: CurvatureRows,
  damping,
  options: CurvatureOptions = BATCH_ONLY,
  arithmetic: Arithmetic = ACCURATE,
) -> Any:
  """What ``solver.prepare`` takes, from this batch's rows alone (no memory)."""
  return KINDS[solver.curvature].batch(solver, rows, damping, options, arithmetic)


def average_in(solver: Solver, memory, rows: CurvatureRows, updates, options, arithmetic):
  """The layer's memory with one batch's rows averaged in (``updates``: those so far)."""
  return KINDS[solver.curvature].average(memory, rows, updates, options, arithmetic)


def refresh(solver: Solver, memory, damping):
  """The layer's memory with what its solver derives from the factors recomputed."""
  return KINDS[solver.curvature].refresh(solver, memory, damping)


def prepared_from(solver: Solver, memory):
  """What ``solver.prepare`` takes, from the layer's memory."""
  return KINDS[solver.curvature].curvature(memory)
