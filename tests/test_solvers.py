"""The solver table (``cgfac_optax._solvers.SOLVERS``) against the dense Kronecker oracle (float64).

Every test here reads the solvers from the table, so a new solver is checked as soon as it has a
record: its operator or solve against ``kron(A, G) + gamma I`` (``tests/oracles.py``), its
Jacobi diagonal, its ``matrix_free`` flag against the shapes its code computes, and the
consistency of the record itself.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _layers
from cgfac_optax._layers import CurvatureRows, LayerShape
from cgfac_optax._solvers import SOLVERS, _base, cg, lowrank, sketch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")

GAMMA = 0.03
ITERATIVE = [n for n, s in SOLVERS.items() if s.iterative]
EXACT = [n for n, s in SOLVERS.items() if s.exact]
WITH_DIAGONAL = [n for n, s in SOLVERS.items() if s.diagonal is not None]
MATRIX_FREE = [n for n, s in SOLVERS.items() if s.matrix_free]
FORMS_FACTORS = [n for n, s in SOLVERS.items() if not s.matrix_free]


def _rows(seed, rows, d_in, d_out, bias):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(rows, d_in))
  if bias:
    a = np.concatenate([a, np.ones((rows, 1))], axis=1)
  g = rng.normal(size=(rows, d_out))
  return a, g


def _curvature(a, g, scale_a, scale_g):
  """The library's rows and the oracle's factors ``A = s_A a^T a``, ``G = s_G g^T g``."""
  rows = CurvatureRows(jnp.asarray(a), jnp.asarray(g), scale_a, scale_g)
  return rows, scale_a * a.T @ a, scale_g * g.T @ g


def _apply(matrix, v):
  """``matrix @ vec(V)`` with the row-major vec of a ``d_A x d_G`` matrix."""
  return (matrix @ np.asarray(v).reshape(-1)).reshape(np.shape(v))


def test_solver_table_is_consistent():
  assert SOLVERS, "no solvers"
  for name, s in SOLVERS.items():
    assert s.name == name, (name, s.name)
    # Iterative (an operator for CG) xor direct (a solve), never both or neither.
    assert (s.operator is not None) != (s.solve is not None), name
    assert s.iterative == (s.operator is not None), name
    if s.iterative:
      # CG is preconditioned by the solver's own preconditioner or by its Jacobi diagonal.
      assert (s.preconditioner is None) != (s.diagonal is None), name
    else:
      assert s.preconditioner is None and s.diagonal is None, name
    assert s.curvature in ("rows", "factors", "sketch"), name
    assert s.refresh is None or s.curvature == "factors", name  # it refreshes from the factors
    # Factors are d^2 arrays; rows and sketches are linear in the widths.
    assert s.matrix_free == (s.curvature != "factors"), name
    shape = LayerShape(rows=64, d_a=33, d_g=10)
    assert s.flops(shape, 3, 1) > 0 and s.memory(shape) > 0, name
    assert s.communication(shape, 3, 1) == 0, name  # one device exchanges nothing
    assert s.communication(shape, 3, 8) > 0, name
    # The option accepts every name in the table.
    cgfac.scale_by_cgfac(GAMMA, solver=name)
    cgfac.scale_by_cgfac(GAMMA, solver={"layer": name})


def test_plan_prints_a_column_for_every_solver():
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"l": {"kernel": shape(20, 8), "bias": shape(8)}}
  stats = {"l": cgfac.DenseStats(shape(16, 20), shape(16, 8))}
  plan = cgfac.plan(params, stats)
  head, row = str(plan).splitlines()
  names = head.split()[5 : 5 + len(SOLVERS)]
  assert names == list(SOLVERS), head
  fields = row.split()
  assert len(fields) == 5 + len(SOLVERS), row
  for name, field in zip(SOLVERS, fields[5:]):
    assert float(field.rstrip("*")) == pytest.approx(plan["l"].cost[name] / 1e6, rel=5e-3), name
  assert set(plan["l"].flops) == set(plan["l"].memory_bytes) == set(SOLVERS)
  assert set(plan["l"].communication_bytes) == set(plan["l"].cost) == set(SOLVERS)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("solver", ITERATIVE)
@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(3, 4, 5), (9, 2, 3)])
def test_operators_equal_kron(solver, bias, rows, d_in, d_out):
  a, g = _rows(0, rows, d_in, d_out, bias)
  # Scales as for a (B, T, d) layer with B = 1 example spread over all rows: s_A != s_G.
  curvature, big_a, big_g = _curvature(a, g, 1.0 / rows, 0.7)
  v = np.random.default_rng(1).normal(size=(a.shape[1], d_out))
  method = SOLVERS[solver]
  got = method.operator(oracles.prepare(method, curvature, GAMMA), jnp.asarray(v))
  want = _apply(oracles.kron_matrix(big_a, big_g, GAMMA), v)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_vec_layout_is_that_of_kernel_and_bias(bias):
  # One example: the K-FAC block is exactly the outer product of the flattened per-example
  # gradient with itself, where the gradient is the kernel (d_in x d_out) in row-major order
  # followed by the bias: the layout the transform uses for the (d_A, d_G) matrix, and the one
  # the oracle's kron(A, G) acts on.
  rng = np.random.default_rng(2)
  x, g = rng.normal(size=3), rng.normal(size=2)
  kernel_grad = np.outer(x, g)
  flat = np.concatenate([kernel_grad.reshape(-1), g if bias else []])
  np.testing.assert_array_equal(
    oracles.as_matrix({"kernel": kernel_grad, **({"bias": g} if bias else {})}).reshape(-1), flat
  )
  a = np.concatenate([x, [1.0]]) if bias else x
  block = oracles.kron_matrix(np.outer(a, a), np.outer(g, g))
  np.testing.assert_allclose(block, np.outer(flat, flat), rtol=1e-13, atol=1e-13)
  rows = _layers.append_ones(jnp.asarray(x[None])) if bias else jnp.asarray(x[None])
  curvature = CurvatureRows(rows, jnp.asarray(g[None]), 1.0, 1.0)
  v = rng.normal(size=(a.size, 2))
  want = np.outer(flat, flat) @ v.reshape(-1)
  got = cg.kronecker_product(cg.prepare(curvature, 0.0), jnp.asarray(v))
  np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12)
  for name in ITERATIVE:  # every operator at zero damping is the same block
    method = SOLVERS[name]
    got = method.operator(oracles.prepare(method, curvature, 0.0), jnp.asarray(v))
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_sequence_rows_match_explicit_sum(bias):
  # (B, T, d) stats: A = sum over all B*T rows / (B*T), G = sum over rows / B.
  batch, time, d_in, d_out = 3, 4, 2, 3
  rng = np.random.default_rng(3)
  x = rng.normal(size=(batch, time, d_in))
  g = rng.normal(size=(batch, time, d_out))
  big_a = np.zeros((d_in + bias, d_in + bias))
  big_g = np.zeros((d_out, d_out))
  for i in range(batch):
    for t in range(time):
      xi = np.concatenate([x[i, t], [1.0]]) if bias else x[i, t]
      big_a += np.outer(xi, xi)
      big_g += np.outer(g[i, t], g[i, t])
  big_a /= batch * time
  big_g /= batch
  # The oracle's rule is the same sum.
  for got, want in zip(oracles.factors(x, g, bias), (big_a, big_g)):
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)

  stats = cgfac.DenseStats(jnp.asarray(x), jnp.asarray(g))
  assert _layers.factor_scales(stats) == (1.0 / (batch * time), 1.0 / batch)
  rows = _layers.curvature_rows(stats, bias, None, jnp.float64)
  assert rows.a.shape == (batch * time, d_in + bias) and rows.g.shape == (batch * time, d_out)
  fa, fg = _base.factors(rows)
  np.testing.assert_allclose(fa, big_a, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(fg, big_g, rtol=1e-13, atol=1e-14)
  v = rng.normal(size=(d_in + bias, d_out))
  got = cg.kronecker_product(cg.prepare(rows, 0.0), jnp.asarray(v))
  np.testing.assert_allclose(got, big_a @ v @ big_g, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("solver", EXACT)
def test_sequence_stats_through_the_transform(solver):
  # End to end: scale_by_cgfac on (B, T, d) stats solves with the explicit-sum factors.
  params, grads, stats = oracles.dense_layer(
    4, 3, 2, (2, 5), name=None, random_grads=True, dtype=np.float64
  )
  want = oracles.layer_solve(stats, grads, GAMMA)
  tx = cgfac.scale_by_cgfac(GAMMA, solver=solver, max_iters=100, tol=1e-14)
  params, grads, stats = jax.tree.map(jnp.asarray, (params, grads, stats))
  updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
  np.testing.assert_allclose(updates["kernel"], want[:-1], rtol=1e-10)
  np.testing.assert_allclose(updates["bias"], want[-1], rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("solver", WITH_DIAGONAL)
def test_jacobi_diagonal_is_kron_diagonal(solver, bias):
  a, g = _rows(5, 6, 4, 3, bias)
  curvature, big_a, big_g = _curvature(a, g, 1.0 / 6, 0.5)
  method = SOLVERS[solver]
  got = method.diagonal(oracles.prepare(method, curvature, GAMMA))
  want = np.diag(oracles.kron_matrix(big_a, big_g, GAMMA)).reshape(a.shape[1], g.shape[1])
  np.testing.assert_allclose(got, want, rtol=1e-13)


def _rank_deficient(seed, rows, d_in, d_out):
  # Rows repeat and one input feature is dead: rank(a) and rank(g) < min(rows, d).
  a, g = _rows(seed, rows // 2, d_in, d_out, bias=False)
  a = np.concatenate([a, a[::-1]])
  g = np.concatenate([g, 2.0 * g[::-1]])
  a[:, 0] = 0.0
  return a, g


CASES = {
  "rows<d": lambda: _rows(6, 3, 7, 5, bias=True),
  "rows>d": lambda: _rows(7, 20, 4, 3, bias=True),
  "rows=1": lambda: _rows(8, 1, 4, 3, bias=True),
  "rank_deficient": lambda: _rank_deficient(9, 8, 6, 5),
  "zero_g": lambda: (_rows(10, 4, 3, 2, bias=True)[0], np.zeros((4, 2))),
}


@pytest.mark.parametrize("solver", EXACT)
@pytest.mark.parametrize("case", sorted(CASES))
def test_solves_equal_dense_solve(solver, case):
  # Direct solvers by their solve, iterative ones by CG on their operator (with their own
  # preconditioner, or Jacobi), run to convergence.
  a, g = CASES[case]()
  curvature, big_a, big_g = _curvature(a, g, 1.0 / a.shape[0], 1.0 / a.shape[0])
  v = np.random.default_rng(11).normal(size=(a.shape[1], g.shape[1]))
  method = SOLVERS[solver]
  got, result = oracles.apply_inverse(
    method, oracles.prepare(method, curvature, GAMMA), jnp.asarray(v)
  )
  want = oracles.kron_solve(big_a, big_g, GAMMA, v)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
  if result is not None:
    assert int(result.iterations[0]) < 500  # converged, not stopped by the bound


@pytest.mark.parametrize("case", sorted(CASES))
def test_kfac_inverse_is_the_factored_damping_solve(case):
  # Not exact: (A + pi s I)^-1 V (G + s/pi I)^-1 with s = sqrt(gamma) and pi the ratio of the
  # factors' mean traces, as a dense Kronecker solve of the factored-damped matrices.
  a, g = CASES[case]()
  curvature, big_a, big_g = _curvature(a, g, 1.0 / a.shape[0], 1.0 / a.shape[0])
  v = np.random.default_rng(11).normal(size=(a.shape[1], g.shape[1]))
  method = SOLVERS["kfac_inverse"]
  got = method.solve(oracles.prepare(method, curvature, GAMMA), jnp.asarray(v))
  ta, tg = np.trace(big_a) / big_a.shape[0], np.trace(big_g) / big_g.shape[0]
  pi = np.clip(np.sqrt(ta / tg), 1e-4, 1e4) if ta > 0 and tg > 0 else 1.0
  root = np.sqrt(GAMMA)
  damped_a = big_a + pi * root * np.eye(big_a.shape[0])
  damped_g = big_g + root / pi * np.eye(big_g.shape[0])
  want = oracles.kron_solve(damped_a, damped_g, 0.0, v)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
  assert not SOLVERS["kfac_inverse"].exact


def test_lowrank_basis_is_orthonormal_and_rank_revealing():
  a, _ = _rank_deficient(12, 8, 6, 5)
  basis, eigenvalues = lowrank.thin_eigenbasis(jnp.asarray(a), 1.0 / 8)
  kept = np.asarray(eigenvalues) > 0
  assert kept.sum() == np.linalg.matrix_rank(a)
  q = np.asarray(basis)[:, kept]
  np.testing.assert_allclose(q.T @ q, np.eye(kept.sum()), atol=1e-12)
  np.testing.assert_allclose(
    q @ np.diag(np.asarray(eigenvalues)[kept]) @ q.T, a.T @ a / 8, atol=1e-12
  )


def _all_shapes(jaxpr) -> set:
  """Shapes of every value a jaxpr computes, nested jaxprs (jit, cond, loops) included."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes |= _all_shapes(inner)
  return shapes


def _step_shapes(method, rows, d_a, d_g):
  """Shapes computed by one step of the solver: prepare, then every function it applies."""

  def step(a, g, v):
    data = oracles.prepare(method, CurvatureRows(a, g, 1.0 / rows, 1.0 / rows), GAMMA)
    if not method.iterative:
      return method.solve(data, v)
    out = [method.operator(data, v)]
    if method.preconditioner is not None:
      out.append(method.preconditioner(data, v))
    if method.diagonal is not None:
      out.append(method.diagonal(data))
    return out

  a, g = _rows(13, rows, d_a, d_g, bias=False)
  return _all_shapes(jax.make_jaxpr(step)(a, g, np.ones((d_a, d_g))).jaxpr)


@pytest.mark.parametrize("solver", MATRIX_FREE)
def test_matrix_free_solvers_never_form_a_factor(solver):
  # What matrix_free promises: nothing of size d_A x d_A or d_G x d_G. A sketch holds whole
  # factors when its rank covers their widths, so its layer is wider than rank + rows.
  d_a, d_g = (9, 7) if SOLVERS[solver].curvature == "rows" else (sketch.DEFAULT_RANK + 9, 80)
  shapes = _step_shapes(SOLVERS[solver], 3, d_a, d_g)
  assert (d_a, d_a) not in shapes and (d_g, d_g) not in shapes
  assert (d_a, d_g) in shapes  # the jaxpr was read


@pytest.mark.parametrize("solver", FORMS_FACTORS)
def test_other_solvers_form_the_factors(solver):
  # The same probe sees the factors in every solver not marked matrix_free, so the test above
  # can fail, and the flag is not set too cautiously.
  shapes = _step_shapes(SOLVERS[solver], 3, 9, 7)
  assert (9, 9) in shapes and (7, 7) in shapes
