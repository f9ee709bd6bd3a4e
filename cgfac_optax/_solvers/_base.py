r"""What every solver is: one record with its functions and its costs.

A solver applies ``(F + \gamma I)^{-1}`` for one layer's Kronecker block
``F = A \otimes G`` (``V -> A V G`` on a ``d_A x d_G`` matrix ``V``), damping
``\gamma`` included. It comes in one of two kinds:

- *iterative*: ``prepare`` builds the curvature data (damping included) once
  per step, and conjugate gradient runs on ``operator(data, V) = (F + \gamma I) V``,
  preconditioned by the solver's own ``preconditioner`` if it has one, else
  optionally by ``diagonal(data) = diag(F + \gamma I)`` (Jacobi);
- *direct*: ``prepare`` factorizes once per step and ``solve(data, V)`` returns
  ``(F + \gamma I)^{-1} V`` (exactly, unless the record says ``exact=False``).

A solver prepares from one of three kinds of curvature: the batch's rows
(:class:`~cgfac_optax._layers.CurvatureRows`: matrix-free, batch-only), the
factors ``A`` and ``G`` themselves, with their eigenbasis when the solver uses
one (:class:`~cgfac_optax._memory.FactorCurvature`), or low-rank sketches of
them (:class:`~cgfac_optax._solvers.sketch.SketchMemory`): formed from the
batch, or running averages kept in the optimizer state
(:mod:`cgfac_optax._memory`).

Next to its functions, a record carries its cost model for one layer of shape
:class:`~cgfac_optax._layers.LayerShape` (``B`` rows, ``n = d_A d_G``): flops
per step and device with the rows split over ``data_shards`` devices (a
multiply-add is 2 flops; a symmetric ``k x k`` eigendecomposition with vectors
is ``9 k^3``, Golub & Van Loan's count), the elements of curvature data it
holds beyond the stats and the gradient, and the elements it exchanges per
step and device when the rows are sharded (zero on one device). An iterative
solver does ``cg_iters + 1`` products: one for the warm start's residual, one
per iteration. :func:`cgfac_optax.plan` reads these to choose a solver per
layer; a new solver is one new record in :data:`cgfac_optax._solvers.SOLVERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax._layers import CurvatureRows, LayerShape

EIGH_FLOPS = 9.0  # per k^3 for a k x k symmetric eigendecomposition with vectors


def eig_flops(k: int) -> float:
  return EIGH_FLOPS * float(k) ** 3


class Solver(NamedTuple):
  """One way to apply a layer's ``(F + damping I)^{-1}``, and what it costs.

  Attributes:
    name: the ``solver=`` option that selects it.
    curvature: ``"rows"``, ``"factors"`` or ``"sketch"``: what ``prepare`` takes.
    refresh: factor-based solvers that keep something computed from the
      factors (an eigenbasis, inverses): ``(factors, damping) -> refreshed``,
      run every step without curvature memory and on the refresh schedule
      with it (:mod:`cgfac_optax._memory`); else None.
    prepare: ``(curvature, damping) -> data``, the curvature data of one step.
    operator: iterative solvers: ``(data, V) -> (F + damping I) V``; else None.
    preconditioner: iterative solvers with one of their own:
      ``(data, R) -> M^{-1} R``; else None.
    diagonal: iterative solvers without their own preconditioner:
      ``data -> diag(F + damping I)`` as a ``d_A x d_G`` matrix (for the
      ``"jacobi"`` option); else None.
    solve: direct solvers: ``(data, V) -> (F + damping I)^{-1} V``; else None.
    flops: ``(shape, cg_iters, data_shards) -> flops`` per step and device.
    memory: ``shape -> elements`` of curvature data held.
    communication: ``(shape, cg_iters, data_shards) -> elements`` exchanged per
      step and device (zero when ``data_shards == 1``).
    matrix_free: whether it never forms anything of size ``d_A^2`` or ``d_G^2``.
    exact: whether its answer is ``(F + damping I)^{-1} V`` for the curvature
      it prepared from (to CG's tolerance for an iterative solver); False for a
      solver that damps otherwise.
  """

  name: str
  curvature: Literal["rows", "factors", "sketch"]
  refresh: Callable[[Any, Any], Any] | None
  prepare: Callable[[Any, Any], Any]
  operator: Callable[[Any, jax.Array], jax.Array] | None
  preconditioner: Callable[[Any, jax.Array], jax.Array] | None
  diagonal: Callable[[Any], jax.Array] | None
  solve: Callable[[Any, jax.Array], jax.Array] | None
  flops: Callable[[LayerShape, int, int], float]
  memory: Callable[[LayerShape], int]
  communication: Callable[[LayerShape, int, int], float]
  matrix_free: bool
  exact: bool

  @property
  def iterative(self) -> bool:
    return self.operator is not None

  @property
  def keeps_memory(self) -> bool:
    """Whether it can keep curvature memory (averaged factors or sketches) between steps."""
    return self.curvature != "rows"

  def reads(self, option: str) -> bool:
    """Whether the option of :data:`SOLVER_OPTIONS` named ``option`` changes what it does."""
    return _READS[option](self)


# The options of scale_by_cgfac that only some solvers read, and which ones read them.
_READS: dict[str, Callable[[Solver], bool]] = {
  "curvature_decay": lambda s: s.keeps_memory,
  "refresh_every": lambda s: s.refresh is not None,
  "sketch_rank": lambda s: s.curvature == "sketch",
  # Jacobi is for CG without a preconditioner of its own; a direct solver has none either.
  "preconditioner": lambda s: s.diagonal is not None,
}
SOLVER_OPTIONS = tuple(_READS)


MatmulPrecision = Literal["default", "high", "highest"]

# The matmul precision when none is asked for, by platform (``jax.default_backend()``). XLA:CPU
# computes float32 products in float32 at every precision, so the accurate one costs nothing
# there. On a GPU "default" is the TF32 tensor-core path and "highest" full float32; on a TPU
# "default" is one bfloat16 pass, "high" three and "highest" six: three passes are close to
# float32 (a 16-bit significand per operand) at half the cost of six.
DEFAULT_PRECISION: dict[str, MatmulPrecision] = {"cpu": "highest", "gpu": "default", "tpu": "high"}


def default_precision(platform: str) -> MatmulPrecision:
  """The matmul precision that ``precision=None`` means on ``platform`` ("cpu", "gpu", ...)."""
  return DEFAULT_PRECISION.get(platform, "highest")


@dataclasses.dataclass(frozen=True)
class Arithmetic:
  """How a solver's curvature products run: an argument, never a global setting.

  Every solver function that multiplies curvature data takes one: ``prepare``
  (the data it returns carries it on to the operator, preconditioner and solve,
  as static pytree data without leaves), :func:`factors`, the sketch update and
  the thin eigenbasis of ``"lowrank"``. Called directly, they default to
  :data:`ACCURATE` (``Arithmetic()``): every product at ``HIGHEST`` precision in
  the solve's dtype, what ``scale_by_cgfac(precision=None)`` means on a CPU.
  :func:`cgfac_optax.scale_by_cgfac` passes :func:`arithmetic_for` of its
  ``precision`` and ``curvature_dtype`` options.

  Attributes:
    precision: the precision of every matmul of the curvature data (``jax.lax.Precision``).
    curvature_dtype: the dtype the curvature data is rounded to before its products (rows,
      and the factors of the factor-based CG operators), with float32 accumulation; ``None``
      keeps the solve's dtype.
  """

  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST
  curvature_dtype: Any = None


jax.tree_util.register_static(Arithmetic)

ACCURATE = Arithmetic()  # what a solver function called directly uses unless told otherwise


def arithmetic_for(
  precision: MatmulPrecision | None, curvature_dtype: Any, platform: str
) -> Arithmetic:
  """The arithmetic of the options ``precision`` (``None``: ``platform``'s default) and dtype."""
  p = jax.lax.Precision[(precision or default_precision(platform)).upper()]
  return Arithmetic(p, None if curvature_dtype is None else jnp.dtype(curvature_dtype))


def curvature_array(x: jax.Array, arithmetic: Arithmetic) -> jax.Array:
  """``x`` in the curvature dtype of ``arithmetic`` (unchanged without one)."""
  dtype = arithmetic.curvature_dtype
  return x if dtype is None else x.astype(dtype)


def solve_dtype(x: jax.Array):
  """The dtype of the solve for curvature data ``x``: its own, at least float32."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _dot(
  x: jax.Array, y: jax.Array, contracting: tuple[int, int], arithmetic: Arithmetic
) -> jax.Array:
  """A product at ``arithmetic``'s precision, accumulated in at least float32.

  When one operand is a 16-bit float (curvature data in bfloat16), the other is rounded to it,
  so the product runs on the 16-bit path; the result is float32 (or wider).
  """
  dtypes = (x.dtype, y.dtype)
  out = jnp.promote_types(jnp.promote_types(*dtypes), jnp.float32)
  narrow = [d for d in dtypes if jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits <= 16]
  operand = narrow[0] if narrow else out
  dims = (((contracting[0],), (contracting[1],)), ((), ()))
  return jax.lax.dot_general(
    x.astype(operand),
    y.astype(operand),
    dims,
    precision=arithmetic.precision,
    preferred_element_type=out,
  )


def matmul(x: jax.Array, y: jax.Array, arithmetic: Arithmetic) -> jax.Array:
  """``x @ y`` at ``arithmetic``'s precision."""
  return _dot(x, y, (x.ndim - 1, 0), arithmetic)


def matmul_t(x: jax.Array, y: jax.Array, arithmetic: Arithmetic) -> jax.Array:
  """``x @ y.T``, contracting the columns of both.

  With the rows of ``y`` sharded over devices, the partitioner then gathers ``y`` once for
  this and any other product with it, rather than once per layout (``y`` and ``y.T``).
  """
  return _dot(x, y, (1, 1), arithmetic)


def factors(rows: CurvatureRows, arithmetic: Arithmetic = ACCURATE) -> Factors:
  """The materialized factors ``A = s_A a^T a`` and ``G = s_G g^T g``.

  From rows in ``arithmetic``'s curvature dtype, accumulated in at least float32.
  """
  a, g = curvature_array(rows.a, arithmetic), curvature_array(rows.g, arithmetic)
  return Factors(
    rows.scale_a * matmul(a.T, a, arithmetic), rows.scale_g * matmul(g.T, g, arithmetic)
  )


class Factors(NamedTuple):
  """A layer's Kronecker factors."""

  a: jax.Array  # d_A x d_A
  g: jax.Array  # d_G x d_G


class FactorCurvature(NamedTuple):
  """What a factor-based solver prepares from: the factors and its refreshed data of them."""

  factors: Factors
  refreshed: Any  # what the solver's ``refresh`` returned (maybe for older factors), or None


def form_factors_flops(shape: LayerShape, data_shards: int) -> float:
  return 2.0 * shape.rows * (shape.d_a**2 + shape.d_g**2) / data_shards


class EigenFactors(NamedTuple):
  """Eigendecompositions ``A = Q_A diag(l_A) Q_A^T`` (thin or full; likewise G) and the damping."""

  q_a: jax.Array  # d_A x k_A
  l_a: jax.Array  # k_A
  q_g: jax.Array  # d_G x k_G
  l_g: jax.Array  # k_G
  damping: jax.Array  # shape=()


class EigenData(NamedTuple):
  """What ``"eigh"`` and ``"lowrank"`` solve with: eigenbases, damping, and the arithmetic."""

  basis: EigenFactors
  arithmetic: Arithmetic


def in_eigenbasis(data: EigenData, v: jax.Array) -> jax.Array:
  """``Q_A^T V Q_G``."""
  b, ar = data.basis, data.arithmetic
  return matmul(matmul(b.q_a.T, v, ar), b.q_g, ar)


def from_eigenbasis(data: EigenData, c: jax.Array) -> jax.Array:
  """``Q_A C Q_G^T``."""
  b, ar = data.basis, data.arithmetic
  return matmul(matmul(b.q_a, c, ar), b.q_g.T, ar)


def damped_eigenvalues(data: EigenData) -> jax.Array:
  """``l_A l_G^T + damping``: the eigenvalues of the damped block on the bases' span."""
  b = data.basis
  return jnp.outer(b.l_a, b.l_g) + b.damping
