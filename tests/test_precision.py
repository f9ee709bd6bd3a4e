"""The matmul precision and the curvature dtype: where they act, and what they cost in accuracy.

Accuracy is measured against the float64 dense solve of ``tests/oracles.py`` for the same
float32 stats, on one dense layer (48 inputs + bias, 24 outputs, 64 rows, damping 0.1), with
CG run to a tight tolerance so that what remains is the arithmetic's error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _memory
from cgfac_optax._layers import CurvatureRows
from cgfac_optax._solvers import SOLVERS, _base
from cgfac_optax._solvers._base import Arithmetic, default_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))

import oracles  # noqa: E402

DAMPING = 0.1
# Measured on this layer (relative error of the solution, Frobenius): float32 at "highest"
# 4e-7 (cg) to 5e-6 (eigh); bfloat16 curvature 2.2e-3 (eigh) to 6.4e-3 (cg_materialized).
FLOAT32_TOL = 2e-5
BFLOAT16_TOL = 2e-2


def _layer():
  return oracles.dense_layer(0, 48, 24, (64,), random_grads=True)


def _update(solver, **options):
  params, grads, stats = _layer()
  tx = cgfac.scale_by_cgfac(
    DAMPING, solver=solver, max_iters=150, tol=1e-7, warm_start=False, **options
  )

  def update(grads, state):
    return tx.update(grads, state, params, layer_stats=stats)

  return update, (grads, tx.init(params)), stats


def _dots(jaxpr) -> list:
  """Every dot_general of a jaxpr, its sub-jaxprs (loops, conditionals) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _dots(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _dots(sub)
  return found


def _precisions(update, args) -> set:
  dots = _dots(jax.make_jaxpr(update)(*args).jaxpr)
  assert dots
  return {p for eqn in dots for p in (eqn.params["precision"] or (None,))}


@pytest.mark.parametrize(
  ("option", "want"),
  [
    ("default", jax.lax.Precision.DEFAULT),
    ("high", jax.lax.Precision.HIGH),
    ("highest", jax.lax.Precision.HIGHEST),
    (None, jax.lax.Precision.HIGHEST),  # the CPU's default
  ],
)
def test_precision_reaches_every_curvature_product(option, want):
  for solver in ("cg", "cg_materialized"):
    update, args, _ = _update(solver, precision=option)
    assert _precisions(update, args) == {want}, solver
  # "pcg"'s operator and preconditioner too; jnp.linalg.inv keeps its own inside the LU solve.
  update, args, _ = _update("pcg", precision=option)
  assert want in _precisions(update, args)


# The inverses of "pcg" and "kfac_inverse" come from jnp.linalg.inv, whose LU solve runs its own
# products; every other solver's products are all the library's.
INVERTING = ("pcg", "kfac_inverse")


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_runs_every_product_at_the_precision(solver):
  update, args, _ = _update(solver, precision="default")
  found = _precisions(update, args)
  if solver in INVERTING:
    assert jax.lax.Precision.DEFAULT in found, found
  else:
    assert found == {jax.lax.Precision.DEFAULT}, found


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_a_solver_called_directly_takes_its_arithmetic_as_an_argument(solver):
  """Outside the transformation, the arithmetic is what the call passes (default: ACCURATE)."""
  method = SOLVERS[solver]
  _, grads, stats = _layer()
  rows = CurvatureRows(stats["dense"].inputs, stats["dense"].output_grads, 1 / 64, 1 / 64)
  v = oracles.as_matrix(grads["dense"])[:48]
  bf16 = jnp.dtype(jnp.bfloat16)
  for arithmetic, want in [
    (None, jax.lax.Precision.HIGHEST),
    (Arithmetic(jax.lax.Precision.HIGH), jax.lax.Precision.HIGH),
    (Arithmetic(jax.lax.Precision.DEFAULT, bf16), jax.lax.Precision.DEFAULT),
  ]:
    given = {} if arithmetic is None else {"arithmetic": arithmetic}

    def apply(a, g, v, given=given):
      rows_ = CurvatureRows(a, g, rows.scale_a, rows.scale_g)
      curvature = _memory.batch_curvature(method, rows_, DAMPING, **given)
      data = method.prepare(curvature, DAMPING, **given)
      return method.operator(data, v) if method.iterative else method.solve(data, v)

    dots = _dots(jax.make_jaxpr(apply)(rows.a, rows.g, v).jaxpr)
    found = {p for eqn in dots for p in (eqn.params["precision"] or (None,))}
    assert want in found and (solver in INVERTING or found == {want}), (arithmetic, found)


def test_the_arithmetic_is_not_a_global_setting():
  assert not hasattr(_base, "arithmetic") and not hasattr(_base, "_ARITHMETIC")
  assert _base.ACCURATE == _base.Arithmetic()
  # As static pytree data it is no leaf of the solvers' data: jit and tree maps pass it by.
  rows = CurvatureRows(jnp.ones((3, 2)), jnp.ones((3, 2)), 1.0, 1.0)
  data = SOLVERS["cg"].prepare(rows, 0.1)
  leaves = jax.tree.leaves(data)
  assert not any(isinstance(x, (Arithmetic, jax.lax.Precision)) for x in leaves), leaves
  assert data.arithmetic == _base.ACCURATE


def test_platform_defaults():
  assert jax.default_backend() == "cpu"
  assert [default_precision(p) for p in ("cpu", "gpu", "tpu")] == ["highest", "default", "high"]


def _relative_error(solver, **options) -> float:
  update, args, stats = _update(solver, **options)
  out, _ = jax.jit(update)(*args)
  got = oracles.as_matrix(jax.tree.map(np.asarray, out["dense"]))
  want = oracles.layer_solve(stats["dense"], args[0]["dense"], DAMPING)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("solver", ["cg", "cg_materialized", "eigh"])
def test_accuracy_against_the_float64_solve(solver):
  full = _relative_error(solver, precision="highest")
  half = _relative_error(solver, curvature_dtype="bfloat16")
  assert full <= FLOAT32_TOL, full
  assert half <= BFLOAT16_TOL, half
  # The bfloat16 rows are in effect: the answer moves by about bfloat16's rounding.
  assert half >= 100 * full, (half, full)


def test_bfloat16_curvature_products_accumulate_in_float32():
  update, args, _ = _update("cg", curvature_dtype="bfloat16")
  dots = _dots(jax.make_jaxpr(update)(*args).jaxpr)
  operand_dtypes = {tuple(v.aval.dtype for v in eqn.invars) for eqn in dots}
  bf16 = jnp.dtype(jnp.bfloat16)
  assert operand_dtypes == {(bf16, bf16)}, operand_dtypes
  assert {eqn.params["preferred_element_type"] for eqn in dots} == {jnp.dtype(jnp.float32)}
  out, state = jax.jit(update)(*args)
  assert out["dense"]["kernel"].dtype == jnp.float32
  assert state.solution["dense"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize(
  ("option", "value", "message"),
  [
    ("precision", "tf32", r"precision must be one of \(None, 'default', 'high', 'highest'\)"),
    ("curvature_dtype", "float16", r"curvature_dtype must be one of \(None, 'bfloat16'\)"),
    ("cg_skip", "while", r"cg_skip must be one of \(None, 'mask', 'cond'\), got 'while'"),
  ],
)
def test_invalid_options_are_named(option, value, message):
  with pytest.raises(ValueError, match=message):
    cgfac.scale_by_cgfac(1e-2, **{option: value})
  with pytest.raises(ValueError, match=message):
    cgfac.cgfac(0.1, **{option: value})
