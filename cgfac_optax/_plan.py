"""Which solver for which layer: the cost model of DESIGN section 2, from static shapes.

For a layer with ``B`` curvature rows, ``d_A`` inputs (plus one for a bias),
``d_G`` outputs, ``n = d_A d_G`` and ``m`` CG iterations, the flops of one step
of each way to apply ``(A (x) G + gamma I)^{-1}``, counted for the code in
:mod:`cgfac_optax._blocks` (a multiply-add is 2 flops, ``E(k) = 9 k^3`` is a
symmetric eigendecomposition with vectors, Golub & Van Loan's count), and their memory are

- ``"cg"`` (matrix-free): ``(m+1) (4Bn + 4B^2 min(d_A, d_G))`` flops,
  ``B(d_A+d_G) + B^2`` elements;
- ``"cg_materialized"``: ``2B(d_A^2+d_G^2) + (m+1) 2n(d_A+d_G)`` flops,
  ``d_A^2 + d_G^2`` elements;
- ``"eigh"`` (exact): ``2B(d_A^2+d_G^2) + E(d_A) + E(d_G) + 4n(d_A+d_G)`` flops,
  ``2(d_A^2 + d_G^2)`` elements;
- ``"lowrank"`` (exact): ``10Bn + 2B^2(5 d_A + 4 d_G) + 2E(B)`` flops,
  ``B(d_A+d_G) + 2B^2`` elements (the solve also projects the remainder on the
  bases' span, for accuracy at tiny damping).

CG does ``m + 1`` products: one for the warm start's residual, one per
iteration. ``m`` is an assumption about the warm start, not a measurement
(default ``min(max_iters, 3)``); pass ``cg_iters`` to change it, and compare it
with the iterations the state records. The memory counts the
curvature data each way holds beyond the stats and the gradient.

"auto" picks, per layer, the way with the fewest flops among those whose
memory fits ``memory_limit`` bytes (the one with the least memory if none
fits). Flops are a proxy: an eigendecomposition runs well below matmul
throughput on every backend, so the model flatters ``"eigh"`` and
``"lowrank"``. In practice: few rows and wide layers go to ``"lowrank"`` (its
cost is about two and a half matrix-free products), many rows and narrow layers (conv
patches, tokens) to ``"cg_materialized"`` or ``"eigh"``, and wide layers whose
factors do not fit in memory, with many rows (a vocabulary projection over all
tokens), to the matrix-free ``"cg"``. The matrix-free product's
``rows x rows`` middle matrix counts against the limit too, so very many rows
send even a lopsided layer to ``"cg_materialized"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _tree

SOLVER_NAMES = ("cg", "cg_materialized", "eigh", "lowrank")
MATRIX_FREE = frozenset({"cg", "lowrank"})  # nothing of size d_A^2 or d_G^2
EIGH_FLOPS = 9.0  # per k^3 for a k x k symmetric eigendecomposition with vectors
DEFAULT_CG_ITERS = 3
DEFAULT_MEMORY_LIMIT = 2**30  # bytes of curvature data per layer
# Flops one byte of communication is worth: about an accelerator's float32 matmul rate over its
# NVLink/ICI bandwidth. Raise it for a slower network (hosts over Ethernet: 10^4 or more).
DEFAULT_FLOPS_PER_BYTE = 1000.0


def solver_flops(
  rows: int, d_a: int, d_g: int, cg_iters: int, data_shards: int = 1
) -> dict[str, float]:
  """Flops per step and device of each solver for one layer (see the module docstring).

  With the rows split over ``data_shards`` devices, the work on the rows divides by
  ``data_shards`` (the matrix-free products, forming the factors, the low-rank Grams and
  bases); the rest (the materialized CG loop, the eigendecompositions, the low-rank solve on
  its bases) runs whole on every device.
  """
  b, n, products, s = float(rows), float(d_a) * d_g, cg_iters + 1, float(data_shards)

  def eig(k):
    return EIGH_FLOPS * float(k) ** 3

  form = 2 * b * (d_a**2 + d_g**2) / s
  grams = 4 * b * b * (d_a + d_g)  # x x^T and x^T U for both sides
  return {
    "cg": products * (4 * b * n + 4 * b * b * min(d_a, d_g)) / s,
    "cg_materialized": form + products * 2 * n * (d_a + d_g),
    "eigh": form + eig(d_a) + eig(d_g) + 4 * n * (d_a + d_g),
    "lowrank": grams / s + 10 * b * n + 2 * b * b * (5 * d_a + 4 * d_g) - grams + 2 * eig(rows),
  }


def solver_communication(
  rows: int, d_a: int, d_g: int, cg_iters: int, data_shards: int = 1
) -> dict[str, float]:
  """Elements one layer's solve exchanges per step with its rows split over ``data_shards``.

  Counted as the results of the collectives XLA's partitioner places (data-parallel: the
  gradients and parameters replicated), per device: for ``"cg"`` each product all-reduces the
  ``d_A x d_G`` result and exchanges the ``rows x rows`` middle's narrow side (``g``'s rows
  gathered, or ``(V g^T)`` gathered and ``a^T k`` reduced when ``d_A <= d_G``); the
  materialized factors are all-reduced once; ``"lowrank"`` gathers the rows and the Grams'
  eigenvectors and reduces the thin bases. Zero on one device.
  """
  if data_shards <= 1:
    return dict.fromkeys(SOLVER_NAMES, 0.0)
  b, products = float(rows), cg_iters + 1
  middle = 2 * b * d_a if d_a <= d_g else b * d_g
  factors = float(d_a * d_a + d_g * d_g)
  return {
    "cg": products * (d_a * d_g + middle),
    "cg_materialized": factors,
    "eigh": factors,
    "lowrank": 2 * b * (d_a + d_g) + 2 * b * b + 2 * b * b / data_shards,
  }


def solver_memory(rows: int, d_a: int, d_g: int) -> dict[str, int]:
  """Elements of curvature data each solver holds for one layer."""
  return {
    "cg": rows * (d_a + d_g) + rows * rows,
    "cg_materialized": d_a * d_a + d_g * d_g,
    "eigh": 2 * (d_a * d_a + d_g * d_g),
    "lowrank": rows * (d_a + d_g) + 2 * rows * rows,
  }


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
    return self.solver in MATRIX_FREE


def plan_layer(
  path: str,
  rows: int,
  d_a: int,
  d_g: int,
  *,
  itemsize: int = 4,
  cg_iters: int = DEFAULT_CG_ITERS,
  memory_limit: int = DEFAULT_MEMORY_LIMIT,
  data_shards: int = 1,
  flops_per_byte: float = DEFAULT_FLOPS_PER_BYTE,
) -> LayerPlan:
  """The cheapest solver for one layer's static shapes, its rows split over ``data_shards``."""
  flops = solver_flops(rows, d_a, d_g, cg_iters, data_shards)
  memory = {k: v * itemsize for k, v in solver_memory(rows, d_a, d_g).items()}
  communication = {
    k: v * itemsize for k, v in solver_communication(rows, d_a, d_g, cg_iters, data_shards).items()
  }
  cost = {k: flops[k] + flops_per_byte * communication[k] for k in SOLVER_NAMES}
  fits = {k: memory[k] <= memory_limit for k in SOLVER_NAMES}
  candidates = [k for k in SOLVER_NAMES if fits[k]]
  if candidates:
    solver = min(candidates, key=lambda k: cost[k])
  else:
    solver = min(SOLVER_NAMES, key=lambda k: memory[k])
  return LayerPlan(path, rows, d_a, d_g, solver, flops, memory, fits, communication, cost)


class Plan(dict):
  """``{layer path: LayerPlan}``, printed as a table."""

  def solvers(self) -> dict[str, str]:
    """``{layer path: solver}``, accepted as ``scale_by_cgfac(solver=...)``."""
    return {p: lp.solver for p, lp in self.items()}

  def __str__(self) -> str:
    names = ("cg", "cg_mat", "eigh", "lowrank")
    width = max([len("layer")] + [len(p) for p in self])
    head = f"{'layer':<{width}}  {'rows':>7} {'d_A':>6} {'d_G':>6}  {'solver':<15}"
    head += "".join(f" {n:>9}" for n in names)
    head += "   MFLOP/step and device, communication included (* over memory limit)"
    lines = [head]
    for p, lp in self.items():
      line = f"{p:<{width}}  {lp.rows:>7} {lp.d_a:>6} {lp.d_g:>6}  {lp.solver:<15}"
      for k in SOLVER_NAMES:
        mark = "" if lp.fits[k] else "*"
        line += f" {lp.cost[k] / 1e6:>8.3g}{mark or ' '}"
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
      solver causes (see :func:`solver_communication`); ``solver="auto"``
      itself plans for one device, so pass this plan's ``solvers()`` to
      ``scale_by_cgfac(solver=...)`` when training sharded.
    flops_per_byte: what one byte exchanged costs, in flops (about the
      device's matmul rate over its interconnect's bandwidth); used only with
      ``data_shards > 1``.

  Returns:
    A :class:`Plan`; ``print`` it for a table, or pass ``plan.solvers()`` as
    ``scale_by_cgfac(solver=...)`` to fix the choice.

  Examples:
    >>> import jax, jax.numpy as jnp, cgfac_optax as cgfac
    >>> shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    >>> params = {"head": {"kernel": shape(512, 50000)}}  # a vocabulary projection
    >>> stats = {"head": cgfac.DenseStats(shape(16, 512, 512), shape(16, 512, 50000))}
    >>> cgfac.plan(params, stats)["head"].solver
    'cg'
  """
  if not isinstance(data_shards, int) or isinstance(data_shards, bool) or data_shards < 1:
    raise ValueError(f"data_shards must be an int >= 1, got {data_shards!r}")
  if not flops_per_byte >= 0:
    raise ValueError(f"flops_per_byte must be >= 0, got {flops_per_byte!r}")
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  leaves = {_tree.path_str(p): leaf for p, leaf in flat}
  iters = min(max_iters, DEFAULT_CG_ITERS) if cg_iters is None else cg_iters
  out = Plan()
  for path, stats in _tree.flatten_stats(layer_stats).items():
    prefix = f"{path}/" if path else ""
    kernel = leaves.get(prefix + "kernel")
    if kernel is None:
      raise ValueError(
        f"layer_stats has stats at {path!r} but params have no {prefix + 'kernel'!r}"
      )
    rows = curvature_rows(stats.inputs.shape, curvature_batch_size)
    d_a = stats.inputs.shape[-1] + (1 if prefix + "bias" in leaves else 0)
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    out[path] = plan_layer(
      path,
      rows,
      d_a,
      stats.output_grads.shape[-1],
      itemsize=jnp.dtype(dtype).itemsize,
      cg_iters=iters,
      memory_limit=memory_limit,
      data_shards=data_shards,
      flops_per_byte=flops_per_byte,
    )
  return out


def curvature_rows(inputs_shape: tuple[int, ...], curvature_batch_size: int | None) -> int:
  """Rows the curvature uses: examples (after subsampling) times positions."""
  examples = inputs_shape[0]
  if curvature_batch_size is not None:
    examples = min(examples, curvature_batch_size)
  return examples * math.prod(inputs_shape[1:-1])


def validate_solver(solver: Any) -> None:
  """Checks a ``solver`` option: a name, ``"auto"`` or ``{layer path: name}``."""
  allowed = (*SOLVER_NAMES, "auto")
  if isinstance(solver, Mapping):
    bad = {p: s for p, s in solver.items() if s not in allowed}
    if bad:
      raise ValueError(f"solver values must be 'auto' or one of {list(SOLVER_NAMES)}, got {bad!r}")
  elif not isinstance(solver, str) or solver not in allowed:
    raise ValueError(
      f"solver must be 'auto', one of {list(SOLVER_NAMES)}, or a dict of them by layer path, "
      f"got {solver!r}"
    )


def layer_solver(
  solver: Any, path: str, rows: int, d_a: int, d_g: int, dtype, max_iters: int
) -> str:
  """The solver one layer uses under the ``solver`` option."""
  name = solver.get(path, "auto") if isinstance(solver, Mapping) else solver
  if name != "auto":
    return name
  # max_iters may be an array (optax.inject_hyperparams): the plan needs a static count.
  iters = min(max_iters, DEFAULT_CG_ITERS) if isinstance(max_iters, int) else DEFAULT_CG_ITERS
  itemsize = jnp.dtype(dtype).itemsize
  return plan_layer(path, rows, d_a, d_g, itemsize=itemsize, cg_iters=iters).solver
