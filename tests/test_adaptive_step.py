"""Step sizes from the quadratic model, through the public optimizer, against a dense 2x2 solve.

The oracle forms the exact Fisher of a tiny two-layer model explicitly (per-example Jacobians by
``jax.jacrev``, the output Hessian of the loss written out), takes the preconditioned direction
``D`` from the non-adaptive transformation, and solves ``min 1/2 x^T C x + b^T x`` with
``np.linalg.solve`` for ``C_ij = u_i^T (F + gamma I) u_j``, ``b_i = grad^T u_i``,
``u = (D, delta_prev)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import cgfac_optax as cgfac

GAMMA = 0.1
N, D_IN, D_HID, K = 8, 3, 4, 3


def problem(loss: str, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 5)
  params = {
    "h": {"kernel": 0.5 * jax.random.normal(keys[0], (D_IN, D_HID)), "bias": jnp.zeros(D_HID)},
    "o": {"kernel": 0.5 * jax.random.normal(keys[1], (D_HID, K)), "bias": jnp.zeros(K)},
  }
  x = jax.random.normal(keys[2], (N, D_IN))
  if loss == "squared_error":
    y = jax.random.normal(keys[3], (N, K))
  else:
    y = jax.random.randint(keys[3], (N,), 0, K)
  return params, x, y


def forward(params, x, eps=None):
  z = x @ params["h"]["kernel"] + params["h"]["bias"]
  if eps is not None:
    z = z + eps["h"]
  h = jnp.tanh(z)
  out = h @ params["o"]["kernel"] + params["o"]["bias"]
  if eps is not None:
    out = out + eps["o"]
  return out, {"h": x, "o": h}


def per_example_loss(loss, out, y):
  if loss == "squared_error":
    return 0.5 * jnp.sum((out - y) ** 2, -1)
  return optax.softmax_cross_entropy_with_integer_labels(out, y)


def grads_and_stats(loss, params, x, y):
  eps = {"h": jnp.zeros((N, D_HID)), "o": jnp.zeros((N, K))}

  def total(p, e):
    out, inputs = forward(p, x, e)
    return per_example_loss(loss, out, y).sum(), inputs

  (_, inputs), (g_params, g_out) = jax.value_and_grad(total, (0, 1), has_aux=True)(params, eps)
  grads = jax.tree.map(lambda t: t / N, g_params)
  stats = {k: cgfac.DenseStats(inputs[k], g_out[k]) for k in inputs}
  return grads, stats


def explicit_fisher(loss, params, x):
  flat, unravel = ravel_pytree(params)
  out = forward(params, x)[0]
  jac = jax.jacrev(lambda f: forward(unravel(f), x)[0])(flat)  # N x K x P
  fisher = np.zeros((flat.size, flat.size))
  for j in range(N):
    if loss == "squared_error":
      h = np.eye(K)
    else:
      p = np.asarray(jax.nn.softmax(out[j]), np.float64)
      h = np.diag(p) - np.outer(p, p)
    jj = np.asarray(jac[j], np.float64)
    fisher += jj.T @ h @ jj / N
  return fisher


def oracle_step(loss, params, x, y, previous):
  """``(delta, (alpha, mu))`` from the dense model, ``previous`` a flat array."""
  grads, stats = grads_and_stats(loss, params, x, y)
  tx = cgfac.scale_by_cgfac(GAMMA, solver="eigh")
  precond, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
  direction = -np.asarray(ravel_pytree(precond)[0], np.float64)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  damped = explicit_fisher(loss, params, x) + GAMMA * np.eye(g.size)
  if not np.any(previous):
    alpha = -(g @ direction) / (direction @ damped @ direction)
    return alpha * direction, np.array([alpha, 0.0])
  u = np.stack([direction, previous])
  coefficients = np.linalg.solve(u @ damped @ u.T, -(u @ g))
  return coefficients @ u, coefficients


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("loss", ["squared_error", "softmax_cross_entropy"])
def test_two_steps_match_the_dense_quadratic_model(loss):
  params, x, y = problem(loss)
  # The oracle solves each step's own batch: the stats are read on every step.
  tx = cgfac.cgfac(None, GAMMA, solver="eigh", curvature_decay=0.0, curvature_every=1)
  state = tx.init(params)
  model = lambda p: cgfac.CurvatureModel(lambda q: forward(q, x)[0], loss)
  previous = np.zeros(ravel_pytree(params)[0].size)
  for _ in range(2):
    grads, stats = grads_and_stats(loss, params, x, y)
    updates, state = tx.update(grads, state, params, layer_stats=stats, curvature_model=model(0))
    delta, coefficients = oracle_step(loss, params, x, y, previous)
    got = np.asarray(ravel_pytree(updates)[0])
    np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(state[0].coefficients, coefficients, rtol=1e-5)
    params = optax.apply_updates(params, updates)
    previous = delta
  assert abs(float(state[0].coefficients[1])) > 1e-6  # the second step did use momentum


def _first_step(loss, value, damping):
  """The first step with ``value=`` and the dense oracle's unbounded step and model."""
  params, x, y = problem(loss)
  tx = cgfac.cgfac(None, damping, solver="eigh", curvature_decay=0.0, curvature_every=1)
  grads, stats = grads_and_stats(loss, params, x, y)
  model = cgfac.CurvatureModel(lambda q: forward(q, x)[0], loss)
  mean_loss = lambda p: jnp.mean(per_example_loss(loss, forward(p, x)[0], y))
  updates, state = tx.update(
    grads,
    tx.init(params),
    params,
    layer_stats=stats,
    curvature_model=model,
    value=value(mean_loss(params)),
    value_fn=mean_loss,
  )
  delta, coefficients = oracle_step(loss, params, x, y, np.zeros(ravel_pytree(params)[0].size))
  fisher = explicit_fisher(loss, params, x)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  return updates, state, delta, coefficients, fisher, g


@pytest.mark.usefixtures("x64")
def test_levenberg_marquardt_damping_reads_the_models_prediction():
  loss = "squared_error"
  params, x, y = problem(loss)
  options = cgfac.AdaptiveDamping(initial=GAMMA, interval=1)
  mean_loss = lambda p: jnp.mean(per_example_loss(loss, forward(p, x)[0], y))
  updates, state, delta, _, fisher, g = _first_step(loss, lambda v: v, options)
  predicted = 0.5 * delta @ fisher @ delta + g @ delta
  actual = float(mean_loss(optax.apply_updates(params, updates)) - mean_loss(params))
  rho = actual / predicted
  factor = options.decay**options.interval
  expected = GAMMA / factor if rho < 0.25 else GAMMA * factor if rho > 0.75 else GAMMA
  np.testing.assert_allclose(float(state[0].control.damping), expected, rtol=1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("loss", ["squared_error", "softmax_cross_entropy"])
def test_a_step_predicted_to_remove_over_half_the_loss_is_cut_to_half(loss):
  # The bound is half the loss value passed; a loss of half the model's predicted decrease makes
  # the bound a quarter of that decrease.
  params, x, y = problem(loss)
  delta, _ = oracle_step(loss, params, x, y, np.zeros(ravel_pytree(params)[0].size))
  grads, _ = grads_and_stats(loss, params, x, y)
  g = np.asarray(ravel_pytree(grads)[0], np.float64)
  fisher = explicit_fisher(loss, params, x)
  model_change = lambda d: 0.5 * d @ fisher @ d + g @ d
  bound = -model_change(delta) / 4
  updates, state, delta, coefficients, fisher, g = _first_step(loss, lambda _: 2 * bound, GAMMA)
  # The smaller root of M(t delta) = -bound, from the explicit Fisher.
  q, p = 0.5 * delta @ fisher @ delta, g @ delta
  t = (-p - np.sqrt(p * p - 4 * q * bound)) / (2 * q)
  assert 0 < t < 1
  got = np.asarray(ravel_pytree(updates)[0])
  np.testing.assert_allclose(got, t * delta, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(model_change(got), -bound, rtol=1e-6)
  np.testing.assert_allclose(state[0].coefficients, t * coefficients, rtol=1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize(
  "value", [lambda v: 1e3 * v, lambda v: jnp.nan, lambda v: -1.0, lambda v: 0.0]
)
def test_a_step_inside_the_bound_or_without_a_usable_value_is_the_models_own(value):
  updates, state, delta, coefficients, _, _ = _first_step("softmax_cross_entropy", value, GAMMA)
  np.testing.assert_allclose(np.asarray(ravel_pytree(updates)[0]), delta, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(state[0].coefficients, coefficients, rtol=1e-5)


@pytest.mark.usefixtures("x64")
def test_a_shortened_step_raises_the_adaptive_damping_between_adaptations():
  # interval=2: the first step adapts the damping from its probe, the second does not, so the
  # second step's damping changes only by the raise a shortened step asks for.
  loss = "squared_error"
  params, x, y = problem(loss)
  options = cgfac.AdaptiveDamping(initial=GAMMA, interval=2)
  tx = cgfac.cgfac(None, options, solver="eigh", curvature_decay=0.0)
  model = cgfac.CurvatureModel(lambda q: forward(q, x)[0], loss)
  mean_loss = lambda p: jnp.mean(per_example_loss(loss, forward(p, x)[0], y))
  state = tx.init(params)
  dampings = []
  for value in (mean_loss, lambda p: 1e-9):
    grads, stats = grads_and_stats(loss, params, x, y)
    updates, state = tx.update(
      grads,
      state,
      params,
      layer_stats=stats,
      curvature_model=model,
      value=value(params),
      value_fn=mean_loss,
    )
    params = optax.apply_updates(params, updates)
    dampings.append(float(state[0].control.damping))
  np.testing.assert_allclose(dampings[1], dampings[0] / options.factor, rtol=1e-6)


def test_a_non_finite_gradient_gives_a_zero_step_and_a_finite_state():
  loss = "squared_error"
  params, x, y = problem(loss)
  tx = cgfac.cgfac(None, GAMMA, solver="eigh")
  grads, stats = grads_and_stats(loss, params, x, y)
  grads["o"]["bias"] = grads["o"]["bias"].at[0].set(jnp.nan)
  model = cgfac.CurvatureModel(lambda q: forward(q, x)[0], loss)
  updates, state = tx.update(
    grads, tx.init(params), params, layer_stats=stats, curvature_model=model
  )
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(state))


def test_missing_curvature_model_says_what_to_pass():
  params, x, y = problem("squared_error")
  grads, stats = grads_and_stats("squared_error", params, x, y)
  tx = cgfac.cgfac(None, GAMMA)
  with pytest.raises(ValueError, match="the quadratic model needs curvature_model at update: "):
    tx.update(grads, tx.init(params), params, layer_stats=stats)


def test_every_missing_input_is_named_in_one_message():
  params, x, y = problem("squared_error")
  grads, stats = grads_and_stats("squared_error", params, x, y)
  tx = cgfac.cgfac()
  state = tx.init(params)
  with pytest.raises(ValueError) as info:
    tx.update(grads, state)
  message = str(info.value)
  assert message.startswith(
    "the quadratic model, adaptive damping and the preconditioner need "
    "params, layer_stats, curvature_model, value, value_fn at update: "
    "they all come from the helpers: "
  ), message
  for line in (
    "loss, grads, extra = cgfac_optax.flax.value_grad_and_extra(model, loss=...)"
    "(params, x, y, key)` (Linen)",
    "cgfac_optax.flax.nnx_value_grad_and_extra(model, x, y, key, loss=...)` (NNX)",
    "cgfac_optax.value_grad_and_extra(apply_fn, loss=...)(params, x, y, key)` (pure JAX)",
    "then `tx.update(grads, state, params, **extra)`",
  ):
    assert line in message, line
  # Only what is missing is named.
  model = cgfac.CurvatureModel(lambda q: forward(q, x)[0], "squared_error")
  with pytest.raises(ValueError, match=r"^adaptive damping needs value, value_fn at update: "):
    tx.update(grads, state, params, layer_stats=stats, curvature_model=model)
  with pytest.raises(TypeError, match="curvature_model must be a cgfac_optax.CurvatureModel"):
    tx.update(
      grads, state, params, layer_stats=stats, curvature_model="model", value=1.0, value_fn=len
    )


@pytest.mark.parametrize(
  ("build", "message"),
  [
    (lambda: cgfac.cgfac(None, momentum=0.5), r"where momentum=0.5 does nothing: leave it"),
    (lambda: cgfac.cgfac(None, kl_clip=1e-2), r"where kl_clip=0.01 does nothing: leave it"),
    (
      lambda: cgfac.scale_by_cgfac(GAMMA, adaptive_step=True, learning_rate=0.1),
      "learning_rate and kl_clip must be None",
    ),
    (lambda: cgfac.CurvatureModel(lambda p: p, "hinge"), "CurvatureModel.loss must be one of"),
  ],
)
def test_adaptive_step_options_are_validated(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def _digits(n=512):
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  return jnp.asarray(x[:n] / 16.0, jnp.float32), jnp.asarray(y[:n])


def _adaptive_tx():
  return cgfac.cgfac(
    None,
    cgfac.AdaptiveDamping(initial=0.1, minimum=1e-6),
    solver="pcg",
    curvature_decay=0.95,
    refresh_every=10,
    max_iters=1,
  )


def test_linen_training_with_curvature_model():
  import flax.linen as nn

  from cgfac_optax import flax as cflax

  x, y = _digits()
  model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(10)])
  params = model.init(jax.random.key(0), x)["params"]
  tx = _adaptive_tx()
  state = tx.init(params)
  # The curvature (stats and quadratic model) of half of each batch of 128.
  fn = cflax.value_grad_and_extra(model, loss="softmax_cross_entropy", curvature_batch_size=64)
  mean_loss = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, xb), yb
  ).mean()

  @jax.jit
  def step(params, state, xb, yb, key):
    _, grads, extra = fn(params, xb, yb, key)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  before = mean_loss(params, x, y)
  for i in range(30):
    idx = jax.random.choice(jax.random.key(i), x.shape[0], (128,), replace=False)
    params, state = step(params, state, x[idx], y[idx], jax.random.key(100 + i))
  after = mean_loss(params, x, y)
  assert after < 0.2 * before, (before, after)
  coefficients = state[0].coefficients
  assert 0 < float(coefficients[0]) and bool(jnp.all(jnp.isfinite(coefficients)))


def test_nnx_optimizer_training_with_curvature_model():
  from flax import nnx

  from cgfac_optax import flax as cflax

  x, y = _digits()

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(64, 32, rngs=rngs)
      self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _adaptive_tx(), wrt=nnx.Param)
  ce = lambda m, xb, yb: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

  @nnx.jit
  def step(model, optimizer, xb, yb, key):
    loss, grads, extra = cflax.nnx_value_grad_and_extra(model, xb, yb, key)
    optimizer.update(model, grads, **extra)
    return loss

  before = ce(model, x, y)
  for i in range(30):
    idx = jax.random.choice(jax.random.key(i), x.shape[0], (128,), replace=False)
    step(model, optimizer, x[idx], y[idx], jax.random.key(100 + i))
  after = ce(model, x, y)
  assert after < 0.2 * before, (before, after)


def test_each_mode_has_its_defaults():
  params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  adaptive = cgfac.cgfac().init(params)[0]
  memory = adaptive.curvature["dense"]
  assert memory.factors.a.shape == (4, 4)  # curvature memory for the default solver
  assert adaptive.control.damping == np.float32(1e-2)  # AdaptiveDamping(initial=1e-2)
  assert adaptive.previous_update is not None
  fixed = cgfac.cgfac(0.1).init(params)[0]
  assert fixed.curvature is None and fixed.previous_update is None
  # An explicit option overrides the mode's default.
  assert not cgfac.cgfac(solver="cg", curvature_decay=0.0).init(params)[0].curvature
  with pytest.raises(ValueError, match="'default'"):
    cgfac.cgfac(curvature_batch_size="all")
