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


def solver_flops(rows: int, d_a: int, d_g: int, cg_iters: int) -> dict[str, float]:
  """Flops per step of each solver for one layer (see the module docstring)."""
  b, n, products = float(rows), float(d_a) * d_g, cg_iters + 1

  def eig(k):
    return EIGH_FLOPS * float(k) ** 3

  form = 2 * b * (d_a**2 + d_g**2)
  return {
    "cg": products * (4 * b * n + 4 * b * b * min(d_a, d_g)),
    "cg_materialized": form + products * 2 * n * (d_a + d_g),
    "eigh": form + eig(d_a) + eig(d_g) + 4 * n * (d_a + d_g),
    "lowrank": 10 * b * n + 2 * b * b * (5 * d_a + 4 * d_g) + 2 * eig(rows),
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
    flops: flops per step of every solver.
    memory_bytes: curvature memory of every solver.
    fits: whether each solver fits the memory limit.
  """

  path: str
  rows: int
  d_a: int
  d_g: int
  solver: str
  flops: dict[str, float]
  memory_bytes: dict[str, int]
  fits: dict[str, bool]

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
) -> LayerPlan:
  """The cheapest solver for one layer's static shapes."""
  flops = solver_flops(rows, d_a, d_g, cg_iters)
  memory = {k: v * itemsize for k, v in solver_memory(rows, d_a, d_g).items()}
  fits = {k: memory[k] <= memory_limit for k in SOLVER_NAMES}
  candidates = [k for k in SOLVER_NAMES if fits[k]]
  if candidates:
    solver = min(candidates, key=lambda k: flops[k])
  else:
    solver = min(SOLVER_NAMES, key=lambda k: memory[k])
  return LayerPlan(path, rows, d_a, d_g, solver, flops, memory, fits)


class Plan(dict):
  """``{layer path: LayerPlan}``, printed as a table."""

  def solvers(self) -> dict[str, str]:
    """``{layer path: solver}``, accepted as ``scale_by_cgfac(solver=...)``."""
    return {p: lp.solver for p, lp in self.items()}

  def __str__(self) -> str:
    names = ("cg", "cg_mat", "eigh", "lowrank")
    width = max([len("layer")] + [len(p) for p in self])
    head = f"{'layer':<{width}}  {'rows':>7} {'d_A':>6} {'d_G':>6}  {'solver':<15}"
    head += "".join(f" {n:>9}" for n in names) + "   MFLOP/step (* over memory limit)"
    lines = [head]
    for p, lp in self.items():
      line = f"{p:<{width}}  {lp.rows:>7} {lp.d_a:>6} {lp.d_g:>6}  {lp.solver:<15}"
      for k in SOLVER_NAMES:
        mark = "" if lp.fits[k] else "*"
        line += f" {lp.flops[k] / 1e6:>8.3g}{mark or ' '}"
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
