"""Which solver for which layer: the cost model of each solver, read from static shapes.

Each solver's record (:mod:`cgfac_optax._solvers`) carries its flops per step,
its curvature memory and its communication under data parallelism for one layer
shape; ``CG``'s cost assumes ``cg_iters`` iterations, an assumption about the warm
start, not a measurement (default ``min(max_iters, 3)``): compare it with the
iterations the state records.

"auto" picks, per layer, the exact solver (each record says whether it is) with the
fewest flops (plus, when sharded, the communication priced in flops) among those whose
memory fits
``memory_limit`` bytes (the one with the least memory if none fits). Flops are
a proxy: an eigendecomposition runs well below matmul throughput on every
backend, so the model flatters ``"eigh"`` and ``"lowrank"``. In practice: few
rows and wide layers go to ``"lowrank"``, many rows and narrow layers (conv
patches, tokens) to ``"cg_materialized"`` or ``"eigh"``, and wide layers whose
factors do not fit in memory, with many rows (a vocabulary projection over all
tokens), to the matrix-free ``"cg"``. The matrix-free product's ``rows x rows``
middle matrix counts against the limit too, so very many rows send even a
lopsided layer to ``"cg_materialized"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp

from cgfac_optax import _layers
from cgfac_optax._layers import LayerShape
from cgfac_optax._options import check_int, check_number
from cgfac_optax._solvers import SOLVERS

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

  @property
  def matrix_free(self) -> bool:
    """Whether the chosen solver never forms anything of size ``d^2``."""
    return SOLVERS[self.solver].matrix_free


def plan_layer(
  path: str,
  shape: LayerShape,
  *,
  itemsize: int = 4,
  cg_iters: int = DEFAULT_CG_ITERS,
  memory_limit: int = DEFAULT_MEMORY_LIMIT,
  data_shards: int = 1,
  flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE,
) -> LayerPlan:
  """The cheapest solver for one layer's static shape, its rows split over ``data_shards``."""
  flops = {k: s.flops(shape, cg_iters, data_shards) for k, s in SOLVERS.items()}
  memory = {k: s.memory(shape) * itemsize for k, s in SOLVERS.items()}
  communication = {
    k: s.communication(shape, cg_iters, data_shards) * itemsize for k, s in SOLVERS.items()
  }
  cost = {k: flops[k] + flops_per_byte * communication[k] for k in SOLVERS}
  fits = {k: memory[k] <= memory_limit for k in SOLVERS}
  # "auto" only changes how the system is solved, never which system: exact solvers only.
  candidates = [k for k, s in SOLVERS.items() if fits[k] and s.exact]
  if candidates:
    solver = min(candidates, key=lambda k: cost[k])
  else:
    solver = min((k for k, s in SOLVERS.items() if s.exact), key=lambda k: memory[k])
  return LayerPlan(path, *shape, solver, flops, memory, fits, communication, cost)


class Plan(dict):
  """``{layer path: LayerPlan}``, printed as a table."""

  def solvers(self) -> dict[str, str]:
    """``{layer path: solver}``, accepted as ``scale_by_cgfac(solver=...)``."""
    return {p: lp.solver for p, lp in self.items()}

  def __str__(self) -> str:
    columns = [max(9, len(name)) for name in SOLVERS]
    width = max([len("layer")] + [len(p) for p in self])
    solver_width = max(len("solver"), *map(len, SOLVERS))
    head = f"{'layer':<{width}}  {'rows':>7} {'d_A':>6} {'d_G':>6}  {'solver':<{solver_width}}"
    head += "".join(f" {n:>{c}}" for n, c in zip(SOLVERS, columns))
    head += "   MFLOP/step and device, communication included (* over memory limit)"
    lines = [head]
    for p, lp in self.items():
      line = f"{p:<{width}}  {lp.rows:>7} {lp.d_a:>6} {lp.d_g:>6}  {lp.solver:<{solver_width}}"
      for k, c in zip(SOLVERS, columns):
        mark = "" if lp.fits[k] else "*"
        line += f" {lp.cost[k] / 1e6:>{c - 1}.3g}{mark or ' '}"
      lines.append(line.rstrip())
    return "\n".join(lines)

  def __repr__(self) -> str:
    return f"Plan({self.solvers()!r})"


def plan(
  params: Any,
  layer_stats: Any,
  *,
  max_iters: int = 10,
  curvature_batch_size: int | None = None,
  cg_iters: int | None = None,
  memory_limit: int = DEFAULT_MEMORY_LIMIT,
  data_shards: int = 1,
  flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE,
) -> Plan:
  """The solver ``solver="auto"`` picks for each layer, with its costs.

  Uses shapes and dtypes only (works on ``jax.ShapeDtypeStruct`` leaves too).

  Args:
    params: the parameters (or gradients): used for each layer's bias and dtype.
    layer_stats: the stats passed to ``update`` (their shapes give the rows).
    max_iters: the transformation's ``max_iters``.
    curvature_batch_size: the transformation's ``curvature_batch_size``.
    cg_iters: CG iterations assumed per step; default
      ``min(max_iters, 3)``.
    memory_limit: bytes of curvature data a layer may hold.
    data_shards: devices the batch is split over (data parallelism). The
      flops then count per device and the choice adds the communication each
      solver causes (each solver's ``communication``); ``solver="auto"``
      itself plans for one device, so pass this plan's ``solvers()`` to
      ``scale_by_cgfac(solver=...)`` when training sharded.
    flops_per_byte: what one byte exchanged costs, in flops (about the
      device's matmul rate over its interconnect's bandwidth); used only with
      ``data_shards > 1``.

  Returns:
    A :class:`Plan`; ``print`` it for a table, or pass ``plan.solvers()`` as
    ``scale_by_cgfac(solver=...)`` to fix the choice.

  Raises:
    ValueError: for a bad ``data_shards`` or ``flops_per_byte``, or stats whose
      layer has no kernel or whose shapes do not fit it.

  Examples:
    >>> import jax, jax.numpy as jnp, cgfac_optax as cgfac
    >>> shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    >>> params = {"head": {"kernel": shape(512, 50000)}}  # a vocabulary projection
    >>> stats = {"head": cgfac.DenseStats(shape(16, 512, 512), shape(16, 512, 50000))}
    >>> cgfac.plan(params, stats)["head"].solver
    'cg'
  """
  check_int("data_shards", data_shards, 1)
  check_number("flops_per_byte", flops_per_byte, lambda f: f >= 0, ">= 0", traced_ok=False)
  paths, leaves, _ = _layers.leaf_paths(params)
  iters = min(max_iters, DEFAULT_CG_ITERS) if cg_iters is None else cg_iters
  out = Plan()
  for layer in _layers.match(paths, leaves, layer_stats):
    kernel = leaves[layer.kernel]
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    out[layer.path] = plan_layer(
      layer.path,
      _layers.shape(layer.stats, layer.bias is not None, curvature_batch_size),
      itemsize=jnp.dtype(dtype).itemsize,
      cg_iters=iters,
      memory_limit=memory_limit,
      data_shards=data_shards,
      flops_per_byte=flops_per_byte,
    )
  return out


def layer_solver(solver: Any, path: str, shape: LayerShape, dtype, max_iters) -> str:
  """The name of the solver one layer uses under the ``solver`` option."""
  name = solver.get(path, "auto") if isinstance(solver, Mapping) else solver
  if name != "auto":
    return name
  # max_iters may be an array (optax.inject_hyperparams): the plan needs a static count.
  iters = min(max_iters, DEFAULT_CG_ITERS) if isinstance(max_iters, int) else DEFAULT_CG_ITERS
  return plan_layer(path, shape, itemsize=jnp.dtype(dtype).itemsize, cg_iters=iters).solver
