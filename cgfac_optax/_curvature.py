"""The curvature stage: which steps read the stats, and each layer's curvature after them.

A layer whose solver keeps curvature memory (:mod:`._memory`) averages a batch's
factors into it only on the steps that read the stats: every ``curvature_every``-th
step (``0, T, 2T, ...``). On those steps ``layer_stats`` (a tree of
:class:`~cgfac_optax.DenseStats`, or a function that computes one, as the helpers
return it) is read once for every layer, inside one ``lax.cond``, so that the pass
that computes the stats (a forward and a backward pass of the curvature examples)
and the factor products run on those steps only; the steps between precondition with
the memory as it is. What a solver derives from its factors (``"pcg"``'s inverses,
``"eigh"``'s eigenbasis) is refreshed on its own schedule, for every layer in one
``lax.cond``. A layer whose solver keeps no memory reads the stats on every step.

With ``weight_sharing="reduce"`` a layer applied at several positions (convolution
patches, tokens) gives one row per example: its inputs averaged and its output
gradients summed over the positions (K-FAC-reduce, Eschenhagen et al. 2023); with
``"expand"`` every position is a row (K-FAC-expand, KFC's convention). See
:func:`cgfac_optax._layers.curvature_rows`. ``"auto"`` picks one of the two for the
whole model from the curvature model's outputs (:func:`resolved`): ``"expand"`` when
they keep positions, so that the loss has a term per position (a language model),
``"reduce"`` when they are one vector per example (a classifier that pools).

Each layer's curvature comes with ``ok``: the stats it read this step and its memory
after it are finite. A layer that is not ok is skipped for the step and keeps its old
memory (:mod:`._precondition`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _finite, _jaxpr, _layers, _memory, _quadratic
from cgfac_optax._layers import Layer
from cgfac_optax._solvers import Solver


class LayerCurvature(NamedTuple):
  """One layer's curvature for this step's solve."""

  prepared: Any  # what the solver's prepare takes
  memory: Any  # the layer's memory after this step, or None
  ok: jax.Array  # shape=(), bool: the stats read this step and the memory are finite


class Reading(NamedTuple):
  """How a step reads the stats, fixed when the transformation is built."""

  curvature_batch_size: int | None
  weight_sharing: str
  options: _memory.CurvatureOptions  # decay, refresh_every, sketch_rank, every


def sharing_for(weight_sharing: str, curvature_model, params) -> str:
  """``"expand"`` or ``"reduce"``: ``weight_sharing`` itself, or what ``"auto"`` picks.

  ``"auto"`` reads the shape of the curvature model's outputs ``(examples, ..., k)``
  (shapes only, nothing computed): with axes between the examples and the outputs, the
  loss has a term per position and each position is a row (``"expand"``); without,
  the positions reach the loss through the layers above (pooling, flattening) and each
  example is one row (``"reduce"``). These are the settings in which each form is exact
  for deep linear networks (Eschenhagen et al. 2023).
  """
  if weight_sharing != "auto":
    return weight_sharing
  if curvature_model is None:
    raise ValueError(
      "weight_sharing='auto' chooses from the outputs of the curvature model: pass "
      "curvature_model= (the helpers' extra holds it), or weight_sharing='expand' or 'reduce'"
    )
  outputs = jax.eval_shape(_quadratic.checked(curvature_model).outputs_fn, params)
  return "expand" if outputs.ndim > 2 else "reduce"


def resolved(reading: Reading, curvature_model, params) -> Reading:
  """``reading`` with ``"auto"`` weight sharing resolved (:func:`sharing_for`)."""
  sharing = sharing_for(reading.weight_sharing, curvature_model, params)
  return reading._replace(weight_sharing=sharing)


def _in_a_branch(layer_stats):
  """``layer_stats`` as it should run inside a ``lax.cond`` branch on this platform.

  On CPU the function's convolutions get the layout XLA runs fast there, which it
  gives them itself only outside branches and loops
  (:func:`cgfac_optax._jaxpr.channels_last_convolutions`): the stats pass's backward
  convolutions of a ResNet otherwise cost several times the same pass run unconditionally.
  """
  if not callable(layer_stats) or jax.default_backend() != "cpu":
    return layer_stats
  return _jaxpr.channels_last_convolutions(layer_stats)


def read_stats(layer_stats) -> dict[str, _layers.DenseStats]:
  """``{layer path: stats}``, computing them if ``layer_stats`` is a function."""
  return _layers.flatten_stats(layer_stats() if callable(layer_stats) else layer_stats)


def stats_shapes(layer_stats) -> Any:
  """The stats' tree, with shapes only (nothing computed) when it is a function."""
  return jax.eval_shape(layer_stats) if callable(layer_stats) else layer_stats


def _rows(layer: Layer, stats: dict, dtype, reading: Reading) -> _layers.CurvatureRows:
  has_bias = layer.bias is not None
  return _layers.curvature_rows(
    stats[layer.path], has_bias, reading.curvature_batch_size, dtype, reading.weight_sharing
  )


def _averaged(layers, methods, memory, stats, dtypes, updates, reading, arithmetic):
  """Every memory layer's memory with this step's rows averaged in, and whether finite."""
  out, ok = {}, {}
  for layer, method, dtype in zip(layers, methods, dtypes):
    rows = _rows(layer, stats, dtype, reading)
    new = _memory.average_in(method, memory[layer.path], rows, updates, reading.options, arithmetic)
    out[layer.path] = new
    ok[layer.path] = _finite.all_finite(rows.a, rows.g, *jax.tree.leaves(new))
  return out, ok


def _refreshed(layers, methods, memory, gamma):
  """Every refreshing layer's memory with its derived data recomputed, and whether finite."""
  out, ok = dict(memory), {}
  for layer, method in zip(layers, methods):
    new = _memory.refresh(method, memory[layer.path], gamma)
    out[layer.path] = new
    ok[layer.path] = _finite.all_finite(*jax.tree.leaves(new))
  return out, ok


def _with_memory(layers, methods, memory, dtypes, stats_of, gamma, count, reading, arithmetic):
  """``(memory, ok)`` by path after the averaging (on reading steps) and the refresh (when due)."""
  every = reading.options.every
  yes = {layer.path: jnp.ones([], bool) for layer in layers}
  current = {layer.path: memory[layer.path] for layer in layers}

  def average():
    stats = stats_of()
    return _averaged(layers, methods, current, stats, dtypes, count // every, reading, arithmetic)

  if every == 1:
    current, ok = average()
  else:
    current, ok = jax.lax.cond(count % every == 0, average, lambda: (current, yes))
  refreshing = [(ly, m) for ly, m in zip(layers, methods) if _memory.refreshes(m)]
  if refreshing:
    subset = ([ly for ly, _ in refreshing], [m for _, m in refreshing], current, gamma)
    refresh_every = reading.options.refresh_every
    if isinstance(refresh_every, int) and refresh_every == 1:
      current, fresh = _refreshed(*subset)
    else:
      no = {ly.path: jnp.ones([], bool) for ly, _ in refreshing}
      due = _memory.refresh_due(count, refresh_every)
      current, fresh = jax.lax.cond(due, lambda: _refreshed(*subset), lambda: (current, no))
    ok = {p: ok[p] & fresh.get(p, True) for p in ok}
  return current, ok


def stage(
  layers: list[Layer],
  methods: list[Solver],
  layer_stats,
  memory: dict,
  gamma,
  count: jax.Array,
  dtypes: list,
  reading: Reading,
  arithmetic,
) -> list[LayerCurvature]:
  """Each layer's curvature for this step (see the module docstring), in ``layers``' order."""
  memory = memory or {}
  kept = [i for i, layer in enumerate(layers) if memory.get(layer.path) is not None]
  batch = [i for i in range(len(layers)) if i not in kept]
  if batch and reading.options.every != 1:
    names = {layers[i].path: methods[i].name for i in batch}
    raise ValueError(
      f"curvature_every={reading.options.every} reads the stats on some steps only, but these "
      f"layers' solvers keep no curvature memory to precondition with in between: {names}; "
      "pass solver='auto_memory' (or a solver that keeps memory), or curvature_every=1"
    )
  if reading.options.every == 1:  # one reading, shared by every layer
    stats = read_stats(layer_stats)
    stats_of = lambda: stats
  else:
    stats_of = lambda: read_stats(_in_a_branch(layer_stats))
  pick = lambda idx, xs: [xs[i] for i in idx]
  new, ok = _with_memory(
    *(pick(kept, xs) for xs in (layers, methods)),
    memory,
    pick(kept, dtypes),
    stats_of,
    gamma,
    count,
    reading,
    arithmetic,
  )
  out = [None] * len(layers)
  for i in kept:
    path = layers[i].path
    out[i] = LayerCurvature(_memory.prepared_from(methods[i], new[path]), new[path], ok[path])
  if batch:
    stats = stats_of()
    for i in batch:
      rows = _rows(layers[i], stats, dtypes[i], reading)
      prepared = _memory.batch_curvature(methods[i], rows, gamma, reading.options, arithmetic)
      out[i] = LayerCurvature(prepared, None, _finite.all_finite(rows.a, rows.g))
  return out
