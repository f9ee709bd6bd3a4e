"""Which solver for which layer: the cost model of each solver, read from static shapes.

Each solver's record (:mod:`cgfac_optax._solvers`) carries its flops per step,
its curvature memory and its communication under data parallelism for one layer
shape; an iterative solver's cost assumes ``cg_iters`` iterations, an assumption
about the warm start, not a measurement (default ``min(max_iters, 3)``): compare
it with the iterations the state records.

A layer's solver comes from the ``solver`` option by one rule, :func:`choose`,
which the transformation, its ``init`` and :func:`plan` all call:

- a solver's name: that solver;
- ``"auto"``: the exact solver (each record says whether it is) with the fewest
  flops (plus, when sharded, the communication priced in flops) among those whose
  memory fits ``memory_limit`` bytes (the one with the least memory if none
  fits). Flops are a proxy: an eigendecomposition runs well below matmul
  throughput on every backend, so the model flatters ``"eigh"`` and
  ``"lowrank"``. Few rows and wide layers go to ``"lowrank"``, many rows and
  narrow layers (conv patches, tokens) to ``"cg_materialized"`` or ``"eigh"``,
  and wide layers whose factors do not fit in memory, with many rows (a
  vocabulary projection over all tokens), to the matrix-free ``"cg"``, unless its
  ``rows x rows`` middle matrix does not fit either. The choice needs the rows,
  so it is made from the stats and cannot size curvature memory at ``init``;
- ``"auto_memory"``: the first of :data:`cgfac_optax._solvers.AUTO_MEMORY`
  (``"pcg"``, then ``"sketch"``) whose memory fits. Their memory depends on the
  parameter shapes alone, so the choice is the same at ``init`` and at ``update``.

A chosen solver whose memory exceeds the limit is refused (:func:`check_fits`)
before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _curvature, _layers, _modes, _options
from cgfac_optax._layers import LayerShape
from cgfac_optax._options import check_int, check_number, check_static_int, is_int
from cgfac_optax._solvers import AUTO_MEMORY, SOLVERS

DEFAULT_CG_ITERS = 3
DEFAULT_MEMORY_LIMIT = 2**30  # bytes of curvature data per layer
# Flops one byte of communication is worth: about an accelerator's float32 matmul rate over its
# NVLink/ICI bandwidth. Raise it for a slower network (hosts over Ethernet: 10^4 or more).
DEFAULT_FLOPS_PER_BYTE = 1000.0


class LayerPlan(NamedTuple):
  """The solver chosen for one layer and the costs it was chosen from.

  Attributes:
    path: the layer's path, e.g. ``"Conv_0"``.
    rows: curvature rows (examples times positions, after
      ``curvature_batch_size``).
    d_a: input width, plus one for a bias.
    d_g: output width.
    solver: the chosen solver.
    flops: flops per step (and device) of every solver.
    memory_bytes: curvature memory of every solver.
    fits: whether each solver fits the memory limit.
    communication_bytes: bytes every solver exchanges per step over the data
      shards (zero on one device).
    cost: what the choice minimises: flops plus ``flops_per_byte`` times the
      communication bytes (the flops on one device).
    option: the ``solver`` option for this layer (a name or a rule).
    memory_limit: the bytes of curvature data the layer may hold.
  """

  path: str
  rows: int
  d_a: int
  d_g: int
  solver: str
  flops: dict[str, float]
  memory_bytes: dict[str, int]
  fits: dict[str, bool]
  communication_bytes: dict[str, float]
  cost: dict[str, float]
  option: str = "auto"
  memory_limit: int = DEFAULT_MEMORY_LIMIT

  @property
  def matrix_free(self) -> bool:
    """Whether the chosen solver never forms anything of size ``d^2``."""
    return SOLVERS[self.solver].matrix_free

  @property
  def memory(self) -> int:
    """Bytes of curvature data the chosen solver holds."""
    return self.memory_bytes[self.solver]

  @property
  def step_flops(self) -> float:
    """Flops per step (and device) of the chosen solver."""
    return self.flops[self.solver]


def _cheapest_exact(fits, cost, memory) -> str:
  # "auto" only changes how the system is solved, never which system: exact solvers only.
  exact = [k for k, s in SOLVERS.items() if s.exact]
  fitting = [k for k in exact if fits[k]]
  if fitting:
    return min(fitting, key=lambda k: cost[k])
  return min(exact, key=lambda k: memory[k])


def _first_memory_fit(fits, cost, memory) -> str:
  return next((k for k in AUTO_MEMORY if fits[k]), AUTO_MEMORY[-1])


RULES = {"auto": _cheapest_exact, "auto_memory": _first_memory_fit}


def plan_layer(
  path: str,
  shape: LayerShape,
  *,
  option: str = "auto",
  itemsize: int = 4,
  cg_iters: int = DEFAULT_CG_ITERS,
  memory_limit: int = DEFAULT_MEMORY_LIMIT,
  data_shards: int = 1,
  flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE,
) -> LayerPlan:
  """Every solver's costs for one layer's static shape, its rows split over ``data_shards``,
  and the solver ``option`` (a name or a rule of :data:`RULES`) takes."""
  flops = {k: s.flops(shape, cg_iters, data_shards) for k, s in SOLVERS.items()}
  memory = {k: s.memory(shape) * itemsize for k, s in SOLVERS.items()}
  communication = {
    k: s.communication(shape, cg_iters, data_shards) * itemsize for k, s in SOLVERS.items()
  }
  cost = {k: flops[k] + flops_per_byte * communication[k] for k in SOLVERS}
  fits = {k: memory[k] <= memory_limit for k in SOLVERS}
  solver = RULES[option](fits, cost, memory) if option in RULES else option
  return LayerPlan(
    path, *shape, solver, flops, memory, fits, communication, cost, option, memory_limit
  )


class SolverChoice(NamedTuple):
  """The options of :func:`cgfac_optax.scale_by_cgfac` that choose each layer's solver."""

  option: Any  # the solver option: a name, a rule, or {layer path: either}
  cg_iters: int  # iterations an iterative solver's cost assumes
  memory_limit: int  # bytes of curvature data per layer
  memory_requested: bool  # the options ask for curvature memory (as Python values)


def solver_choice(solver, max_iters, memory_limit, curvature_decay, refresh_every) -> SolverChoice:
  """The :class:`SolverChoice` of the transformation's options."""
  # max_iters may be an array (optax.inject_hyperparams): the cost model needs a static count.
  iters = min(max_iters, DEFAULT_CG_ITERS) if is_int(max_iters) else DEFAULT_CG_ITERS
  limit = DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit
  requested = _options.memory_requested(curvature_decay, refresh_every)
  return SolverChoice(solver, iters, limit, requested)


def layer_option(option: Any, path: str) -> str:
  """The ``solver`` option for one layer: its entry in a dict (default ``"auto"``), or itself."""
  return option.get(path, "auto") if isinstance(option, Mapping) else option


def choose(choice: SolverChoice, path: str, shape: LayerShape, dtype, **costs) -> LayerPlan:
  """The one rule that gives a layer its solver (module docstring), with the costs behind it.

  ``costs``: ``data_shards`` and ``flops_per_byte`` of :func:`plan_layer`.

  Raises:
    ValueError: for ``"auto"`` when the options ask for curvature memory, which is
      allocated at ``init``, before the stats that ``"auto"`` chooses from.
  """
  option = layer_option(choice.option, path)
  if option == "auto" and choice.memory_requested:
    raise ValueError(
      f"curvature memory is allocated at init, before any stats, so layer {path!r} needs "
      f"a named solver, not 'auto': pass solver= one of {list(SOLVERS)} or 'auto_memory' "
      "(or a dict by path)"
    )
  itemsize = jnp.dtype(jnp.promote_types(dtype, jnp.float32)).itemsize
  return plan_layer(
    path,
    shape,
    option=option,
    itemsize=itemsize,
    cg_iters=choice.cg_iters,
    memory_limit=choice.memory_limit,
    **costs,
  )


def _size(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= size:
      return f"{n} bytes ({n / size:.3g} {unit})"
  return f"{n} bytes"


def check_fits(lp: LayerPlan) -> None:
  """Refuses a layer whose chosen solver needs more curvature memory than its limit.

  The message names the layer, the solver, the bytes and the limit, and what to pass
  instead: a solver that fits (at ``init``, where the plan has no rows, one that keeps
  curvature memory), fewer rows where the memory grows with them, or a larger limit.
  """
  if lp.fits[lp.solver]:
    return
  needs, at_init = lp.memory_bytes[lp.solver], lp.rows == 0
  fitting = [k for k in SOLVERS if lp.fits[k] and (SOLVERS[k].keeps_memory or not at_init)]
  exact = [k for k in fitting if SOLVERS[k].exact]
  best = min(exact or fitting, key=lambda k: lp.cost[k]) if fitting else None
  instead = [f"solver={{{lp.path!r}: {best!r}}} (the ones that fit: {fitting})"] if best else []
  if not SOLVERS[lp.solver].keeps_memory:
    instead.append("a smaller curvature_batch_size")
  instead.append(f"memory_limit >= {needs}")
  chosen = f"solver {lp.solver!r}" + (f" (chosen by {lp.option!r})" if lp.option in RULES else "")
  rows = f"{lp.rows} rows, " if lp.rows else ""
  raise ValueError(
    f"layer {lp.path!r}: {chosen} needs {_size(needs)} of curvature data "
    f"({rows}d_A {lp.d_a}, d_G {lp.d_g}), over memory_limit={lp.memory_limit}; pass "
    f"{', '.join(instead[:-1])}{' or ' if len(instead) > 1 else ''}{instead[-1]}"
  )


class FallbackParam(NamedTuple):
  """A parameter without stats and the fallback update it takes."""

  path: str
  shape: tuple[int, ...]
  fallback: str


class Plan(dict):
  """``{layer path: LayerPlan}``, printed as a table; ``fallback`` lists the other parameters.

  ``weight_sharing`` is how the layers applied at several positions make their rows
  (``"expand"`` or ``"reduce"``; for ``"auto"`` without a curvature model, a note that
  the rows are counted as ``"expand"``'s), ``None`` when no layer is.
  """

  def __init__(
    self,
    layers=(),
    fallback: list[FallbackParam] | None = None,
    weight_sharing: str | None = None,
  ):
    super().__init__(layers)
    self.fallback = list(fallback or [])
    self.weight_sharing = weight_sharing

  def solvers(self) -> dict[str, str]:
    """``{layer path: solver}``, accepted as ``scale_by_cgfac(solver=...)``."""
    return {p: lp.solver for p, lp in self.items()}

  def __str__(self) -> str:
    sharing = [] if self.weight_sharing is None else ["", f"weight_sharing: {self.weight_sharing}"]
    return "\n".join(_layer_lines(self) + sharing + _fallback_lines(self.fallback))

  def __repr__(self) -> str:
    return f"Plan({self.solvers()!r}, fallback={[f.path for f in self.fallback]!r})"


def _layer_lines(p: Plan) -> list[str]:
  columns = [max(9, len(name)) for name in SOLVERS]
  width = max([len("layer")] + [len(path) for path in p])
  sw = max(len("solver"), *map(len, SOLVERS))
  head = f"{'layer':<{width}}  {'rows':>7} {'d_A':>6} {'d_G':>6}  {'solver':<{sw}}"
  head += "".join(f" {n:>{c}}" for n, c in zip(SOLVERS, columns))
  head += "   MFLOP/step and device, communication included (* over memory limit)"
  lines = [head]
  for path, lp in p.items():
    line = f"{path:<{width}}  {lp.rows:>7} {lp.d_a:>6} {lp.d_g:>6}  {lp.solver:<{sw}}"
    for k, c in zip(SOLVERS, columns):
      line += f" {lp.cost[k] / 1e6:>{c - 1}.3g}{' ' if lp.fits[k] else '*'}"
    lines.append(line.rstrip())
  return lines


def _fallback_lines(fallback: list[FallbackParam]) -> list[str]:
  if not fallback:
    return []
  width = max(len(f.path) for f in fallback)
  lines = ["", f"{len(fallback)} parameter(s) without stats take the fallback update:"]
  lines += [f"  {f.path:<{width}}  {str(f.shape):<16} {f.fallback!r}" for f in fallback]
  return lines


def plan(
  params: Any,
  layer_stats: Any,
  *,
  learning_rate: Any = None,
  solver: Any = None,
  max_iters: int | None = None,
  curvature_batch_size: int | None | str = "default",
  curvature_decay: float | None = None,
  refresh_every: int | None = None,
  weight_sharing: str | None = None,
  memory_limit: int | None = None,
  fallback: str = "diagonal",
  curvature_model: Any = None,
  cg_iters: int | None = None,
  data_shards: int = 1,
  flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE,
) -> Plan:
  """The solver :func:`cgfac` runs on each layer, with its costs, and the fallback parameters.

  The options are :func:`cgfac`'s, with its mode's defaults, and each layer's
  solver comes from the rule the transformation itself applies:
  ``plan(params, stats)`` is what ``cgfac()`` runs, ``plan(params, stats,
  learning_rate=0.1)`` what ``cgfac(0.1)`` runs (``learning_rate`` only selects
  the mode; its value is not used). A solver whose memory exceeds
  ``memory_limit`` is marked with ``*``; ``update`` refuses it. Uses shapes and
  dtypes only (works on ``jax.ShapeDtypeStruct`` leaves too).

  Args:
    params: the parameters (or gradients): each layer's bias and dtype, and
      the parameters without stats.
    layer_stats: the stats passed to ``update`` (their shapes give the rows).
    learning_rate: ``None`` for :func:`cgfac`'s adaptive mode, else its
      fixed-rate mode.
    solver, max_iters, curvature_batch_size, curvature_decay, refresh_every,
      weight_sharing, memory_limit, fallback: as :func:`cgfac` takes them.
    curvature_model: what ``weight_sharing="auto"`` (``cgfac()``'s default)
      chooses from, as ``update`` takes it (the helpers' ``extra`` holds it).
      Without it, layers with positions are counted with ``"expand"``'s rows
      (the most ``"auto"`` can use), unless that changes a layer's solver:
      then ``plan`` raises and asks for it.
    cg_iters: CG iterations assumed per step; default ``min(max_iters, 3)``,
      what the transformation assumes.
    data_shards: devices the batch is split over (data parallelism). The
      flops then count per device and ``"auto"`` adds the communication each
      solver causes; the transformation itself plans for one device, so pass
      this plan's ``solvers()`` as ``solver=`` when training sharded.
    flops_per_byte: what one byte exchanged costs, in flops (about the
      device's matmul rate over its interconnect's bandwidth); used only with
      ``data_shards > 1``.

  Returns:
    A :class:`Plan`; ``print`` it for a table, or pass ``plan.solvers()`` as
    ``solver=`` to fix the choice.

  Raises:
    ValueError: for a bad option, or stats whose layer has no kernel or whose
      shapes do not fit it; as the transformation, for ``solver="auto"`` with
      curvature memory.

  Examples:
    >>> import jax, jax.numpy as jnp, cgfac_optax as cgfac
    >>> shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    >>> params = {"head": {"kernel": shape(512, 50000)}}  # a vocabulary projection
    >>> stats = {"head": cgfac.DenseStats(shape(16, 512, 512), shape(16, 512, 50000))}
    >>> cgfac.plan(params, stats)["head"].solver  # cgfac(): "pcg"'s factors do not fit
    'sketch'
    >>> cgfac.plan(params, stats, learning_rate=0.1)["head"].solver  # cgfac(0.1)
    'cg'
  """
  check_int("data_shards", data_shards, 1)
  check_number("flops_per_byte", flops_per_byte, lambda f: f >= 0, ">= 0", traced_ok=False)
  mode = _modes.resolve(
    learning_rate,
    solver=solver,
    max_iters=max_iters,
    curvature_batch_size=curvature_batch_size,
    curvature_decay=curvature_decay,
    refresh_every=refresh_every,
    weight_sharing=weight_sharing,
  )
  _options.check_solver(mode["solver"])
  if memory_limit is not None:
    check_static_int("memory_limit", memory_limit, "chooses the solvers when tracing")
  if fallback not in _options.FALLBACKS:
    raise ValueError(f"fallback must be one of {_options.FALLBACKS}, got {fallback!r}")
  check_int("cg_iters", cg_iters, 0, optional=True)
  choice = solver_choice(
    mode["solver"], mode["max_iters"], memory_limit, mode["curvature_decay"], mode["refresh_every"]
  )
  if cg_iters is not None:
    choice = choice._replace(cg_iters=cg_iters)
  paths, leaves, _ = _layers.leaf_paths(params)
  if callable(layer_stats):  # as the helpers give them: shapes only, nothing computed
    layer_stats = jax.eval_shape(layer_stats)
  layers = _layers.match(paths, leaves, layer_stats)
  size, sharing = mode["curvature_batch_size"], mode["weight_sharing"]
  costs = dict(data_shards=data_shards, flops_per_byte=flops_per_byte)

  def layer_plans(sharing: str) -> dict[str, LayerPlan]:
    out = {}
    for layer in layers:
      shape = _layers.shape(layer.stats, layer.bias is not None, size, sharing)
      out[layer.path] = choose(choice, layer.path, shape, leaves[layer.kernel].dtype, **costs)
    return out

  fallback_params = _fallback_params(paths, leaves, layers, fallback)
  if not any(layer.stats.inputs.ndim > 2 for layer in layers):  # no positions: nothing to choose
    return Plan(layer_plans("expand"), fallback=fallback_params)
  if sharing == "auto" and curvature_model is None:
    # Counted as "expand", the most rows "auto" can use, where the solvers do not depend on it.
    expand, reduce = layer_plans("expand"), layer_plans("reduce")
    if any(expand[p].solver != reduce[p].solver for p in expand):
      _curvature.sharing_for(sharing, None, params)  # raises: the choice needs the model
    note = "auto (rows counted as 'expand'; pass curvature_model= to resolve it)"
    return Plan(expand, fallback=fallback_params, weight_sharing=note)
  sharing = _curvature.sharing_for(sharing, curvature_model, params)
  return Plan(layer_plans(sharing), fallback=fallback_params, weight_sharing=sharing)


def _fallback_params(paths, leaves, layers, fallback: str) -> list[FallbackParam]:
  covered = _layers.covered(layers)
  return [
    FallbackParam(p, tuple(leaf.shape), fallback)
    for i, (p, leaf) in enumerate(zip(paths, leaves))
    if i not in covered
  ]
