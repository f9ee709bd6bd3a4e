"""The local quadratic model: the exact Fisher Gram matrix, its 2x2 solve, and rho.

References are independent of the code under test: the Gram matrix against a dense Fisher
``sum_n J_n^T H_n J_n`` built from per-example Jacobians (``jax.jacrev``) and the output
Fishers written out as matrices; the solve against ``np.linalg.solve``; the predicted change
against the quadratic model evaluated directly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from cgfac_optax import _damping, _losses
from cgfac_optax._damping import NO_INFORMATION, reduction_ratio
from cgfac_optax._quadratic import CurvatureModel, gram, step_coefficients

LOSSES = sorted(_losses.LOSSES)


# --- gram -------------------------------------------------------------------------------------


def _mlp(params, x):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _init(key, d, h, k, dtype):
  ks = jax.random.split(key, 4)
  return {
    "w1": jax.random.normal(ks[0], (d, h), dtype),
    "b1": 0.1 * jax.random.normal(ks[1], (h,), dtype),
    "w2": jax.random.normal(ks[2], (h, k), dtype),
    "b2": 0.1 * jax.random.normal(ks[3], (k,), dtype),
  }


def _output_fisher(loss, y):
  """The per-position output Fisher as an explicit ``(k, k)`` matrix."""
  k = y.shape[-1]
  if loss == "softmax_cross_entropy":
    p = np.asarray(jax.nn.softmax(y))
    return np.diag(p) - np.outer(p, p)
  if loss == "sigmoid_binary_cross_entropy":
    p = np.asarray(jax.nn.sigmoid(y))
    return np.diag(p * (1 - p))
  return np.eye(k)


def _dense_fisher(loss, params, x):
  """``F = sum_{n, pos} J^T H J / (examples * positions)`` of the mean loss, dense."""
  flat, unravel = ravel_pytree(params)
  fisher = np.zeros((flat.size, flat.size))
  examples = x.shape[0]
  positions = int(np.prod(x.shape[1:-1], dtype=int))
  for n in range(examples):
    f_n = lambda theta, n=n: _mlp(unravel(theta), x[n]).reshape(-1, _K)
    jac = np.asarray(jax.jacrev(f_n)(flat))  # (positions, k, params)
    y = np.asarray(f_n(flat))
    for pos in range(positions):
      fisher += jac[pos].T @ _output_fisher(loss, y[pos]) @ jac[pos]
  return fisher / (examples * positions)


_K = 3


@pytest.mark.parametrize("positions", [(), (2,)])
@pytest.mark.parametrize("loss", LOSSES)
def test_gram_matches_dense_fisher(x64, loss, positions):
  keys = jax.random.split(jax.random.key(0), 5)
  params = _init(keys[0], 4, 5, _K, jnp.float64)
  x = jax.random.normal(keys[1], (6, *positions, 4), jnp.float64)
  vectors = [
    jax.tree.map(lambda p, key=key: jax.random.normal(key, p.shape, p.dtype), params)
    for key in keys[2:]
  ]
  model = CurvatureModel(lambda p: _mlp(p, x), loss)
  ours = gram(model, params, vectors)

  fisher = _dense_fisher(loss, params, x)
  u = np.stack([np.asarray(ravel_pytree(v)[0]) for v in vectors])
  reference = u @ fisher @ u.T
  assert ours.shape == (3, 3)
  assert ours.dtype == jnp.float64
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-12)
  # A nonzero Fisher, so a Gram matrix of zeros could not pass.
  assert np.min(np.diag(reference)) > 1e-3


def test_gram_float32_jit_and_dtype_cast(x64):
  """float32 parameters with float64 vectors: cast for the product, math in float32, jittable."""
  params = _init(jax.random.key(3), 4, 5, _K, jnp.float32)
  x = jax.random.normal(jax.random.key(4), (8, 4), jnp.float32)
  vectors = [
    jax.tree.map(lambda p, s=s: jnp.full(p.shape, s, jnp.float64), params) for s in (0.3, -0.1)
  ]
  model = CurvatureModel(lambda p: _mlp(p, x), "softmax_cross_entropy")
  ours = jax.jit(gram, static_argnums=0)(model, params, vectors)
  assert ours.dtype == jnp.float32
  np.testing.assert_array_equal(ours, ours.T)  # exactly, for the solve

  params64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  fisher = _dense_fisher("softmax_cross_entropy", params64, x.astype(jnp.float64))
  u = np.stack([np.asarray(ravel_pytree(v)[0]) for v in vectors])
  np.testing.assert_allclose(ours, u @ fisher @ u.T, rtol=1e-4)


def test_curvature_model_validates_loss():
  with pytest.raises(ValueError, match="squared_error"):
    CurvatureModel(lambda p: p, "mse")
  with pytest.raises(TypeError, match="callable"):
    CurvatureModel(None, "squared_error")
  model = CurvatureModel(lambda p: p, "squared_error")
  assert model.loss == "squared_error"
  assert model._fields == ("outputs_fn", "loss")


# --- step_coefficients ------------------------------------------------------------------------


def _model_value(c, b, x):
  x = np.asarray(x)
  return 0.5 * x @ c @ x + b @ x


@pytest.mark.parametrize("seed", range(6))
def test_step_coefficients_solves_random_spd(x64, seed):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(2, 2))
  c = a @ a.T + 0.1 * np.eye(2)
  b = rng.normal(size=2)
  x, predicted = step_coefficients(jnp.asarray(c), jnp.asarray(b))
  reference = -np.linalg.solve(c, b)
  np.testing.assert_allclose(x, reference, rtol=1e-10)
  np.testing.assert_allclose(predicted, _model_value(c, b, reference), rtol=1e-10)
  assert predicted < 0
  # The second coefficient matters here: the 1-D minimum is strictly higher.
  assert _model_value(c, b, np.array([-b[0] / c[0, 0], 0.0])) > predicted + 1e-6


def test_step_coefficients_scale_invariant_float32():
  """Vectors of wildly different lengths: the unit-diagonal solve still matches in float32."""
  c = np.array([[2.0, 0.5], [0.5, 1.0]])
  b = np.array([1.0, -0.3])
  s = np.array([1e-15, 1e15])  # u_i -> s_i u_i scales C and b; x_i scales by 1 / s_i
  x, predicted = step_coefficients(
    jnp.asarray(s[:, None] * c * s[None, :], jnp.float32), jnp.asarray(s * b, jnp.float32)
  )
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(x) * s, -np.linalg.solve(c, b), rtol=1e-5)
  np.testing.assert_allclose(predicted, 0.5 * b @ -np.linalg.solve(c, b), rtol=1e-5)


def test_step_coefficients_first_step_is_1d(x64):
  c = jnp.array([[3.0, 0.0], [0.0, 0.0]])  # delta_prev = 0: zero row and column
  b = jnp.array([-1.5, 0.0])
  x, predicted = step_coefficients(c, b)
  np.testing.assert_allclose(x, [0.5, 0.0], rtol=1e-12)
  np.testing.assert_allclose(predicted, _model_value(np.asarray(c), np.asarray(b), [0.5, 0.0]))
  x1, predicted1 = step_coefficients(c[:1, :1], b[:1])
  assert x1.shape == (1,)
  np.testing.assert_allclose(x1, [0.5], rtol=1e-12)
  np.testing.assert_allclose(predicted1, -0.375, rtol=1e-12)


def test_step_coefficients_parallel_vectors_fall_back(x64):
  """delta_prev = 2 D exactly: C is singular, the 1-D answer along D is the minimum."""
  f = 1.7
  c = jnp.array([[f, 2 * f], [2 * f, 4 * f]])
  b = jnp.array([-0.7, -1.4])
  x, predicted = step_coefficients(c, b)
  np.testing.assert_allclose(x, [0.7 / f, 0.0], rtol=1e-12)
  np.testing.assert_allclose(predicted, -0.5 * 0.49 / f, rtol=1e-12)


def test_step_coefficients_rcond(x64):
  """Nearly parallel vectors (``1 - r^2 = 1e-10``): 1-D by default, 2-D when allowed."""
  r = np.sqrt(1 - 1e-10)
  c = np.array([[1.0, r], [r, 1.0]])
  b = np.array([-1.0, -0.5])
  x, predicted = step_coefficients(jnp.asarray(c), jnp.asarray(b))
  np.testing.assert_allclose(x, [1.0, 0.0], rtol=1e-12)
  np.testing.assert_allclose(predicted, -0.5, rtol=1e-12)
  x, predicted = step_coefficients(jnp.asarray(c), jnp.asarray(b), rcond=0.0)
  np.testing.assert_allclose(x, -np.linalg.solve(c, b), rtol=1e-4)
  assert predicted < -1e8


@pytest.mark.parametrize(
  "c, b, expected",
  [
    # A bad second vector: the 1-D step along the first.
    ([[2.0, np.nan], [np.nan, 1.0]], [-1.0, 0.5], [0.5, 0.0]),
    ([[2.0, 0.0], [0.0, np.inf]], [-1.0, 0.5], [0.5, 0.0]),
    ([[2.0, 0.0], [0.0, 1.0]], [-1.0, np.nan], [0.5, 0.0]),
    ([[2.0, 3.0], [3.0, 1.0]], [-1.0, 0.5], [0.5, 0.0]),  # indefinite
    ([[2.0, 0.0], [0.0, -1.0]], [-1.0, 0.5], [0.5, 0.0]),  # negative curvature
    # Nothing usable: zeros.
    ([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0], [0.0, 0.0]),
    ([[0.0, 0.0], [0.0, 1.0]], [-1.0, 0.5], [0.0, 0.0]),
    ([[np.nan, 0.0], [0.0, 1.0]], [-1.0, 0.5], [0.0, 0.0]),
    ([[2.0, 0.0], [0.0, 1.0]], [np.inf, 0.5], [0.0, 0.0]),
    ([[-2.0, 0.0], [0.0, 1.0]], [-1.0, 0.5], [0.0, 0.0]),
    ([[1e-45, 0.0], [0.0, 1.0]], [-1e30, 0.5], [0.0, 0.0]),  # overflows float32
    ([[1e-30, 0.0], [0.0, 1.0]], [-1e10, 0.5], [0.0, 0.0]),  # the coefficient overflows
    ([[1e-20, 0.0], [0.0, 1.0]], [-1e10, 0.5], [0.0, 0.0]),  # only the prediction overflows
  ],
)
def test_step_coefficients_degenerate_inputs(c, b, expected):
  for fn in (step_coefficients, jax.jit(step_coefficients)):
    x, predicted = fn(jnp.asarray(c, jnp.float32), jnp.asarray(b, jnp.float32))
    assert np.all(np.isfinite(x)) and np.isfinite(predicted)
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    np.testing.assert_allclose(predicted, 0.5 * np.dot(np.nan_to_num(b), expected), rtol=1e-6)
    assert predicted <= 0


def test_step_coefficients_jit_matches_eager(x64):
  rng = np.random.default_rng(7)
  a = rng.normal(size=(2, 2))
  c = jnp.asarray(a @ a.T + 0.5 * np.eye(2))
  b = jnp.asarray(rng.normal(size=2))
  eager = step_coefficients(c, b)
  jitted = jax.jit(step_coefficients)(c, b)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-12)
  np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-12)
  np.testing.assert_allclose(eager[0], -np.linalg.solve(np.asarray(c), np.asarray(b)), rtol=1e-10)


def test_step_coefficients_rejects_bad_shapes():
  with pytest.raises(ValueError, match="shape"):
    step_coefficients(jnp.eye(3), jnp.ones(3))
  with pytest.raises(ValueError, match="shape"):
    step_coefficients(jnp.eye(2), jnp.ones(1))


def test_quadratic_model_end_to_end(x64):
  """Gram + damping + solve: the step minimizes the damped model along the plane."""
  params = _init(jax.random.key(5), 3, 4, _K, jnp.float64)
  x = jax.random.normal(jax.random.key(6), (5, 3), jnp.float64)
  labels = jax.random.randint(jax.random.key(7), (5,), 0, _K)
  kind = _losses.get_loss("softmax_cross_entropy")
  loss_fn = lambda p: kind.per_example(_mlp(p, x), labels).mean()
  grad = jax.grad(loss_fn)(params)
  direction = jax.tree.map(lambda g: -g, grad)
  prev = jax.tree.map(lambda p: 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  lam = 0.1

  model = CurvatureModel(lambda p: _mlp(p, x), "softmax_cross_entropy")
  vectors = [direction, prev]
  u = np.stack([np.asarray(ravel_pytree(v)[0]) for v in vectors])
  c = gram(model, params, vectors) + lam * jnp.asarray(u @ u.T)
  b = jnp.asarray(u @ np.asarray(ravel_pytree(grad)[0]))
  coeffs, predicted = jax.jit(step_coefficients)(c, b)

  fisher = _dense_fisher("softmax_cross_entropy", params, x) + lam * np.eye(u.shape[1])
  g = np.asarray(ravel_pytree(grad)[0])
  model_value = lambda d: 0.5 * d @ fisher @ d + g @ d
  delta = np.asarray(coeffs) @ u
  np.testing.assert_allclose(predicted, model_value(delta), rtol=1e-8)
  for eps in ([1e-3, 0], [0, 1e-3], [-1e-3, 1e-3]):
    assert model_value((np.asarray(coeffs) + eps) @ u) > model_value(delta)


# --- reduction_ratio --------------------------------------------------------------------------


def test_reduction_ratio_values():
  np.testing.assert_allclose(reduction_ratio(2.0, 1.5, -1.0), 0.5)
  np.testing.assert_allclose(reduction_ratio(2.0, 1.0, -0.5), 2.0)
  np.testing.assert_allclose(reduction_ratio(2.0, 2.5, -1.0), -0.5)
  info = NO_INFORMATION
  for before, after, predicted in [
    (2.0, 1.0, 0.0),
    (2.0, 1.0, 0.3),
    (2.0, 1.0, np.nan),
    (2.0, 1.0, -np.inf),
    (np.nan, 1.0, -1.0),
    (np.inf, np.inf, -1.0),
  ]:
    assert reduction_ratio(before, after, predicted) == info, (before, after, predicted)
  for after in (np.inf, np.nan):
    for predicted in (-1.0, 0.0):
      assert reduction_ratio(2.0, after, predicted) == -np.inf
  rho = jax.jit(reduction_ratio)(2.0, 1.5, -1.0)
  assert rho.dtype == jnp.float32 and np.isclose(rho, 0.5)


@pytest.mark.parametrize(
  "before, after, predicted",
  [
    (2.0, 1.9, -1.0),  # rho 0.1: raise
    (2.0, 1.5, -1.0),  # rho 0.5: keep
    (2.0, 1.0, -1.0),  # rho 1: lower
    (2.0, 2.5, -1.0),  # rho < 0: raise
    (2.0, 1.0, 0.0),  # no information: keep
    (2.0, np.inf, 0.0),  # blew up: raise
    (2.0, np.nan, -1.0),  # blew up: raise
    (np.nan, 1.0, -1.0),  # no information: keep
    (2.0, 1.0, np.nan),  # no information: keep
  ],
)
def test_reduction_ratio_agrees_with_damping_rule(before, after, predicted):
  options = _damping.AdaptiveDamping(initial=1.0, minimum=1e-3, maximum=1e3)
  new = _damping.adapt(jnp.float32(1.0), before, after, predicted, options)
  rho = reduction_ratio(before, after, predicted)
  expected = 1 / options.factor if rho < 0.25 else options.factor if rho > 0.75 else 1.0
  np.testing.assert_allclose(new, expected, rtol=1e-6)
