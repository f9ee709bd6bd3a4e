"""Batched CG against ``jax.scipy.sparse.linalg.cg`` and ``np.linalg.solve`` (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgfac_optax import batched_cg

pytestmark = pytest.mark.usefixtures("x64")

SHAPES = [(3, 4), (7,), (2, 5)]


def _spd(rng, n, cond=50.0):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T


def _problem(seed, shapes=SHAPES, cond=50.0):
  """One SPD matrix, right-hand side and warm start per block."""
  rng = np.random.default_rng(seed)
  mats = [jnp.asarray(_spd(rng, int(np.prod(s)), cond)) for s in shapes]
  b = [jnp.asarray(rng.normal(size=s)) for s in shapes]
  x0 = [jnp.asarray(0.1 * rng.normal(size=s)) for s in shapes]
  return mats, b, x0


def _op(m, shape):
  return lambda v: (m @ v.reshape(-1)).reshape(shape)


def _jacobi(m, shape):
  d = jnp.diagonal(m).reshape(shape)
  return lambda r: r / d


@functools.partial(jax.jit, static_argnames=("jacobi", "skip"))
def _run(mats, b, x0, max_iters, tol, jacobi=False, skip=None):
  """batched_cg on dense SPD blocks; bounds are traced so that tests share one compilation."""
  ops = [_op(m, bi.shape) for m, bi in zip(mats, b)]
  precs = [_jacobi(m, bi.shape) for m, bi in zip(mats, b)] if jacobi else None
  return batched_cg(ops, b, x0, max_iters=max_iters, tol=tol, preconditioners=precs, skip=skip)


@functools.partial(jax.jit, static_argnames="jacobi")
def _jax_cg(m, b, x0, max_iters, jacobi=False):
  """The reference: jax.scipy.sparse.linalg.cg on one block, run for exactly max_iters steps."""
  precond = _jacobi(m, b.shape) if jacobi else None
  x, _ = jax.scipy.sparse.linalg.cg(
    _op(m, b.shape), b, x0, tol=0.0, atol=0.0, maxiter=max_iters, M=precond
  )
  return x


def _true_residual(m, b, x):
  b, x = np.asarray(b).reshape(-1), np.asarray(x).reshape(-1)
  return np.linalg.norm(b - m @ x) / np.linalg.norm(b)


def _dense_solve(m, b):
  return np.linalg.solve(m, np.asarray(b).reshape(-1)).reshape(b.shape)


@pytest.mark.parametrize("jacobi", [False, True])
def test_matches_jax_cg_iteration_by_iteration(jacobi):
  mats, b, x0 = _problem(0)
  for k in (1, 2, 3):
    result = _run(mats, b, x0, k, 0.0, jacobi=jacobi)
    np.testing.assert_array_equal(result.iterations, k)
    for i in range(len(SHAPES)):
      want = _jax_cg(mats[i], b[i], x0[i], k, jacobi=jacobi)
      np.testing.assert_allclose(result.x[i], want, rtol=1e-11, atol=1e-12)
      assert result.residual[i] == pytest.approx(_true_residual(mats[i], b[i], want), rel=1e-9)


@pytest.mark.parametrize("jacobi", [False, True])
def test_converges_to_dense_solve(jacobi):
  mats, b, x0 = _problem(1)
  result = _run(mats, b, x0, 100, 1e-12, jacobi=jacobi)
  for i, m in enumerate(mats):
    np.testing.assert_allclose(result.x[i], _dense_solve(m, b[i]), rtol=1e-9, atol=1e-10)
    true = _true_residual(m, b[i], result.x[i])
    assert true <= 1e-11
    assert result.residual[i] <= 1e-12
    assert abs(result.residual[i] - true) <= 1e-12
    assert 1 <= result.iterations[i] <= 2 * b[i].size


def test_reported_iterations_and_residuals_are_truthful():
  # Each block's reported count is the number of iterations that produced its x, and its
  # reported residual is ||b - A x|| / ||b|| of that x, whatever stopped it.
  mats, b, x0 = _problem(2, cond=1e3)
  result = _run(mats, b, x0, 6, 1e-2)
  for i in range(len(SHAPES)):
    k = int(result.iterations[i])
    assert 1 <= k <= 6
    want = _jax_cg(mats[i], b[i], x0[i], k)
    # cond(A) = 1e3: rounding in the two implementations' dot products differs at ~1e-10.
    assert np.linalg.norm(result.x[i] - want) <= 1e-8 * np.linalg.norm(want)
    true = _true_residual(mats[i], b[i], result.x[i])
    assert result.residual[i] == pytest.approx(true, rel=1e-8)
    # It stopped at the first k that met the tolerance, or ran out of iterations.
    if k < 6:
      assert true <= 1e-2
    if k > 1:
      assert _true_residual(mats[i], b[i], _jax_cg(mats[i], b[i], x0[i], k - 1)) > 1e-2


def test_zero_rhs_gives_zero_in_zero_iterations():
  mats, b, x0 = _problem(3)
  b[1] = jnp.zeros_like(b[1])
  result = _run(mats, b, x0, 50, 1e-10)
  np.testing.assert_array_equal(result.x[1], 0.0)
  assert result.iterations[1] == 0
  assert result.residual[1] == 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in result.x)
  for i in (0, 2):  # the other blocks are solved as usual
    np.testing.assert_allclose(result.x[i], _dense_solve(mats[i], b[i]), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["b", "x0"])
def test_non_finite_input_returns_x0_and_nan_residual(bad, where):
  mats, b, x0 = _problem(4)
  if where == "b":
    b[0] = b[0].at[1, 2].set(bad)
  else:
    x0[0] = x0[0].at[0, 0].set(bad)
  result = _run(mats, b, x0, 50, 1e-10)
  np.testing.assert_array_equal(result.x[0], x0[0])
  assert result.iterations[0] == 0
  assert np.isnan(result.residual[0])
  for i in (1, 2):
    np.testing.assert_allclose(result.x[i], _dense_solve(mats[i], b[i]), rtol=1e-8, atol=1e-9)
    assert np.isfinite(result.residual[i])


@pytest.mark.parametrize(
  "operator",
  [lambda v: -v, lambda v: jnp.zeros_like(v)],
  ids=["negative_definite", "zero"],
)
def test_breakdown_stops_the_block_without_nan(operator):
  # p.Ap <= 0 on the first step: the block is left at x0, with its true residual.
  mats, b, x0 = _problem(5)
  ops = [operator] + [_op(m, s) for m, s in zip(mats[1:], SHAPES[1:])]
  result = batched_cg(ops, b, x0, max_iters=50, tol=1e-10)
  np.testing.assert_array_equal(result.x[0], x0[0])
  assert result.iterations[0] == 0
  true = np.linalg.norm(b[0] - operator(x0[0])) / np.linalg.norm(b[0])
  assert result.residual[0] == pytest.approx(true, rel=1e-12)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in result.x)
  assert result.iterations[1] > 0 and result.residual[1] <= 1e-10


def test_breakdown_after_progress_keeps_the_last_good_iterate():
  # An indefinite operator: CG makes progress, then meets p.Ap <= 0 and stops there.
  m = jnp.diag(jnp.asarray([1.0, 2.0, -3.0]))
  b, x0 = jnp.asarray([1.0, 1.0, 0.5]), jnp.zeros(3)
  result = _run([m], [b], [x0], 10, 1e-12)
  k = int(result.iterations[0])
  assert k == 1  # p.Ap = 2.25 on the first step, < 0 on the second
  assert bool(jnp.all(jnp.isfinite(result.x[0])))
  np.testing.assert_allclose(result.x[0], _jax_cg(m, b, x0, k), rtol=1e-12)
  assert result.residual[0] == pytest.approx(_true_residual(m, b, result.x[0]), rel=1e-10)


def test_converged_blocks_stop_while_others_continue():
  rng = np.random.default_rng(6)
  mats = [2.0 * jnp.eye(6), jnp.asarray(_spd(rng, 8, cond=1e4))]  # CG solves 2 I in one step
  b = [jnp.asarray(rng.normal(size=s)) for s in [(2, 3), (8,)]]
  x0 = [jnp.zeros_like(bi) for bi in b]
  short = _run(mats, b, x0, 1, 1e-10)
  long = _run(mats, b, x0, 6, 1e-10)
  np.testing.assert_array_equal(short.iterations, [1, 1])
  np.testing.assert_array_equal(long.iterations, [1, 6])
  np.testing.assert_array_equal(long.x[0], short.x[0])  # bit for bit: frozen after converging
  np.testing.assert_allclose(long.x[0], np.asarray(b[0]) / 2.0, rtol=1e-14)
  assert long.residual[1] < short.residual[1]


def test_warm_start_at_the_solution_takes_zero_iterations():
  mats, b, _ = _problem(7)
  x_star = [jnp.asarray(_dense_solve(m, bi)) for m, bi in zip(mats, b)]
  result = _run(mats, b, x_star, 50, 1e-8)
  np.testing.assert_array_equal(result.iterations, 0)
  for x, xs in zip(result.x, x_star):
    np.testing.assert_array_equal(x, xs)


def test_float32_blocks_stay_float32():
  # Under x64, so that any promotion to float64 would show.
  mats, b, x0 = _problem(9)
  cast = lambda xs: [x.astype(jnp.float32) for x in xs]
  result = _run(cast(mats), cast(b), cast(x0), 30, jnp.float32(1e-4))
  assert all(x.dtype == jnp.float32 for x in result.x)
  assert result.iterations.dtype == jnp.int32
  assert result.residual.dtype == jnp.float32
  assert bool(jnp.all(result.residual <= 1e-4))


def test_blocks_of_different_dtypes_keep_theirs():
  # A float32 block beside a float64 one: the float64 block keeps full accuracy, and neither
  # dtype leaks into the other's iterates.
  mats, b, x0 = _problem(11)
  b[0], x0[0], mats[0] = (v.astype(jnp.float32) for v in (b[0], x0[0], mats[0]))
  result = _run(mats, b, x0, 100, 1e-12)
  assert [x.dtype for x in result.x] == [jnp.float32, jnp.float64, jnp.float64]
  np.testing.assert_allclose(result.x[1], _dense_solve(mats[1], b[1]), rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(result.x[0], _dense_solve(mats[0], b[0]), rtol=1e-3, atol=1e-4)


def test_needs_one_operator_per_block():
  mats, b, x0 = _problem(10)
  with pytest.raises(ValueError, match=r"one operator, b and x0 per block, got 1, 3, 3"):
    batched_cg([_op(mats[0], SHAPES[0])], b, x0, max_iters=3, tol=0.0)


@pytest.mark.parametrize("jacobi", [False, True])
def test_masked_and_conditional_skipping_give_the_same_solve(jacobi):
  # Blocks that stop at different iterations: a converged block's products are discarded
  # ("mask") or never computed ("cond"); either way it stays frozen, bit for bit.
  rng = np.random.default_rng(12)
  mats = [2.0 * jnp.eye(6), jnp.asarray(_spd(rng, 8, cond=50)), jnp.asarray(_spd(rng, 5, 5))]
  b = [jnp.asarray(rng.normal(size=s)) for s in [(2, 3), (8,), (5,)]]
  x0 = [jnp.zeros_like(bi) for bi in b]
  short = _run(mats, b, x0, 1, 1e-6, jacobi=jacobi, skip="mask")
  mask = _run(mats, b, x0, 20, 1e-6, jacobi=jacobi, skip="mask")
  cond = _run(mats, b, x0, 20, 1e-6, jacobi=jacobi, skip="cond")
  assert len(set(np.asarray(mask.iterations).tolist())) > 1, mask.iterations
  np.testing.assert_array_equal(mask.iterations, cond.iterations)
  np.testing.assert_array_equal(mask.x[0], short.x[0])
  for got, want in zip(mask.x, cond.x):
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
  # Relative residuals at rounding level (1e-12) depend on the summation order of each path.
  np.testing.assert_allclose(mask.residual, cond.residual, rtol=1e-8, atol=1e-11)


def test_unknown_skip_is_named():
  mats, b, x0 = _problem(13)
  ops = [_op(m, s) for m, s in zip(mats, SHAPES)]
  with pytest.raises(ValueError, match=r"skip must be None or one of \('mask', 'cond'\), got 'x'"):
    batched_cg(ops, b, x0, max_iters=3, tol=0.0, skip="x")
