"""Per-layer blocks against the explicit Kronecker matrix ``kron(A, G) + gamma I`` (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _blocks, _transform

pytestmark = pytest.mark.usefixtures("x64")

GAMMA = 0.03


def _rows(seed, rows, d_in, d_out, bias):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(rows, d_in))
  if bias:
    a = np.concatenate([a, np.ones((rows, 1))], axis=1)
  g = rng.normal(size=(rows, d_out))
  return a, g


def _kron_matrix(a, g, scale_a, scale_g, gamma):
  """The damped K-FAC block as an explicit ``(d_A d_G) x (d_A d_G)`` matrix."""
  big_a = scale_a * a.T @ a
  big_g = scale_g * g.T @ g
  return np.kron(big_a, big_g) + gamma * np.eye(big_a.shape[0] * big_g.shape[0])


def _apply(matrix, v):
  """``matrix @ vec(V)`` with the row-major vec of a ``d_A x d_G`` matrix."""
  return (matrix @ v.reshape(-1)).reshape(v.shape)


def _solve(matrix, v):
  return np.linalg.solve(matrix, v.reshape(-1)).reshape(v.shape)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("solver", ["cg", "cg_materialized"])
@pytest.mark.parametrize(("rows", "d_in", "d_out"), [(3, 4, 5), (9, 2, 3)])
def test_products_equal_kron(solver, bias, rows, d_in, d_out):
  a, g = _rows(0, rows, d_in, d_out, bias)
  # Scales as for a (B, T, d) layer with B = 1 example spread over all rows: s_A != s_G.
  scale_a, scale_g = 1.0 / rows, 0.7
  v = np.random.default_rng(1).normal(size=(a.shape[1], d_out))
  method = _blocks.SOLVERS[solver]
  assert method.iterative
  data = method.prepare(jnp.asarray(a), jnp.asarray(g), scale_a, scale_g)
  got = method.apply(data, jnp.asarray(v)) + GAMMA * v
  want = _apply(_kron_matrix(a, g, scale_a, scale_g, GAMMA), v)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_vec_layout_is_that_of_kernel_and_bias(bias):
  # One example: the K-FAC block is exactly the outer product of the flattened per-example
  # gradient with itself, where the gradient is the kernel (d_in x d_out) in row-major order
  # followed by the bias: the layout the transform uses for the (d_A, d_G) matrix.
  rng = np.random.default_rng(2)
  x, g = rng.normal(size=3), rng.normal(size=2)
  kernel_grad = np.outer(x, g)
  flat = np.concatenate([kernel_grad.reshape(-1), g if bias else []])
  a = np.concatenate([x, [1.0]]) if bias else x
  block = _kron_matrix(a[None], g[None], 1.0, 1.0, 0.0)
  np.testing.assert_allclose(block, np.outer(flat, flat), rtol=1e-13, atol=1e-13)
  rows = _blocks.append_ones(jnp.asarray(x[None])) if bias else jnp.asarray(x[None])
  v = rng.normal(size=(a.size, 2))
  got = _blocks.rows_matvec(_blocks.rows_prepare(rows, jnp.asarray(g[None]), 1.0, 1.0), v)
  np.testing.assert_allclose(got.reshape(-1), np.outer(flat, flat) @ v.reshape(-1), rtol=1e-12)


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

  stats = cgfac.DenseStats(jnp.asarray(x), jnp.asarray(g))
  assert _blocks.factor_scales(stats) == (1.0 / (batch * time), 1.0 / batch)
  a_rows, g_rows, sa, sg = _transform._curvature_rows(stats, bias, None, jnp.float64)
  assert a_rows.shape == (batch * time, d_in + bias) and g_rows.shape == (batch * time, d_out)
  fa, fg = _blocks.factors(a_rows, g_rows, sa, sg)
  np.testing.assert_allclose(fa, big_a, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(fg, big_g, rtol=1e-13, atol=1e-14)
  v = rng.normal(size=(d_in + bias, d_out))
  got = _blocks.rows_matvec(_blocks.rows_prepare(a_rows, g_rows, sa, sg), jnp.asarray(v))
  np.testing.assert_allclose(got, big_a @ v @ big_g, rtol=1e-12, atol=1e-13)


def test_sequence_stats_through_the_transform():
  # End to end: scale_by_cgfac on (B, T, d) stats solves with the explicit-sum factors.
  batch, time, d_in, d_out = 2, 5, 3, 2
  rng = np.random.default_rng(4)
  x = rng.normal(size=(batch, time, d_in))
  g = rng.normal(size=(batch, time, d_out))
  a = np.concatenate([x.reshape(-1, d_in), np.ones((batch * time, 1))], 1)
  big_a = sum(np.outer(r, r) for r in a) / (batch * time)
  big_g = sum(np.outer(r, r) for r in g.reshape(-1, d_out)) / batch
  matrix = np.kron(big_a, big_g) + GAMMA * np.eye((d_in + 1) * d_out)
  grad = rng.normal(size=(d_in + 1, d_out))
  want = _solve(matrix, grad)

  params = {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros(d_out)}
  grads = {"kernel": jnp.asarray(grad[:-1]), "bias": jnp.asarray(grad[-1])}
  tx = cgfac.scale_by_cgfac(GAMMA, solver="eigh")
  updates, _ = tx.update(
    grads, tx.init(params), params, layer_stats=cgfac.DenseStats(jnp.asarray(x), jnp.asarray(g))
  )
  np.testing.assert_allclose(updates["kernel"], want[:-1], rtol=1e-10)
  np.testing.assert_allclose(updates["bias"], want[-1], rtol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_jacobi_diagonal_is_kron_diagonal(bias):
  a, g = _rows(5, 6, 4, 3, bias)
  scale_a, scale_g = 1.0 / 6, 0.5
  got = _blocks.jacobi_diagonal(jnp.asarray(a), jnp.asarray(g), scale_a, scale_g) + GAMMA
  want = np.diag(_kron_matrix(a, g, scale_a, scale_g, GAMMA)).reshape(a.shape[1], g.shape[1])
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


@pytest.mark.parametrize("solver", ["eigh", "lowrank"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_solves_equal_dense_solve(solver, case):
  a, g = CASES[case]()
  scale_a, scale_g = 1.0 / a.shape[0], 1.0 / a.shape[0]
  v = np.random.default_rng(11).normal(size=(a.shape[1], g.shape[1]))
  method = _blocks.SOLVERS[solver]
  assert not method.iterative
  data = method.prepare(jnp.asarray(a), jnp.asarray(g), scale_a, scale_g)
  got = method.apply(data, jnp.asarray(v), GAMMA)
  want = _solve(_kron_matrix(a, g, scale_a, scale_g, GAMMA), v)
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_lowrank_basis_is_orthonormal_and_rank_revealing():
  a, _ = _rank_deficient(12, 8, 6, 5)
  basis, eigenvalues = _blocks._thin_eigenbasis(jnp.asarray(a), 1.0 / 8)
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


@pytest.mark.parametrize("solver", ["cg", "lowrank"])
def test_row_solvers_never_form_a_factor(solver):
  # The matrix-free product and the low-rank solve hold nothing of size d_A x d_A or d_G x d_G.
  rows, d_a, d_g = 3, 9, 7
  a, g = _rows(13, rows, d_a, d_g, bias=False)
  method = _blocks.SOLVERS[solver]

  def step(a, g, v):
    data = method.prepare(a, g, 1.0 / rows, 1.0 / rows)
    return method.apply(data, v) if method.iterative else method.apply(data, v, GAMMA)

  shapes = _all_shapes(jax.make_jaxpr(step)(a, g, np.ones((d_a, d_g))).jaxpr)
  assert (d_a, d_a) not in shapes and (d_g, d_g) not in shapes
  assert (d_a, d_g) in shapes  # the jaxpr was read


def test_eigh_forms_the_factors():
  # The same probe sees the factors in the eigh solver, so the test above can fail.
  rows, d_a, d_g = 3, 9, 7
  a, g = _rows(13, rows, d_a, d_g, bias=False)
  method = _blocks.SOLVERS["eigh"]
  shapes = _all_shapes(jax.make_jaxpr(lambda a, g: method.prepare(a, g, 1.0, 1.0))(a, g).jaxpr)
  assert (d_a, d_a) in shapes and (d_g, d_g) in shapes
