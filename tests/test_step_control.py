"""Damping schedules, Levenberg-Marquardt adaptive damping and KL clipping."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgfac_optax as cgfac

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import digits_mlp  # noqa: E402
import oracles  # noqa: E402


def layer(seed=0, d_in=3, d_out=2, rows=8):
  """One dense layer at zero: params, a consistent gradient, stats and the explicit K-FAC block."""
  params, grads, stats = oracles.dense_layer(seed, d_in, d_out, (rows,))
  big_a, big_g = oracles.factors(stats["dense"].inputs, stats["dense"].output_grads, bias=True)
  return params, grads, stats, (big_a, big_g)


def vec(tree):
  return oracles.as_matrix(tree["dense"]).ravel()


def solve(factors, b, damping):
  return oracles.kron_solve(*factors, damping, b.reshape(factors[0].shape[0], -1)).ravel()


# Damping schedules.


def test_damping_schedule_is_evaluated_at_the_step_count():
  params, grads, stats, factors = layer()
  schedule = lambda count: 10.0 ** (-1.0 - count)
  tx = cgfac.scale_by_cgfac(schedule, solver="eigh")
  state = tx.init(params)
  for k in range(3):
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    np.testing.assert_allclose(vec(updates), solve(factors, vec(grads), schedule(k)), rtol=2e-4)
    np.testing.assert_allclose(float(state.control.damping), schedule(k), rtol=1e-6)


def test_optax_schedule_as_damping():
  params, grads, stats, factors = layer()
  schedule = optax.linear_schedule(1.0, 0.1, transition_steps=1)
  tx = cgfac.scale_by_cgfac(schedule, solver="lowrank")
  state = tx.init(params)
  _, state = tx.update(grads, state, params, layer_stats=stats)
  updates, state = tx.update(grads, state, params, layer_stats=stats)
  np.testing.assert_allclose(vec(updates), solve(factors, vec(grads), 0.1), rtol=2e-4)


# KL clipping.


@pytest.mark.parametrize("solver", ["eigh", "cg"])
def test_kl_clip_scales_the_solution_by_the_stated_factor(solver):
  params, grads, stats, factors = layer()
  lr = optax.linear_schedule(2.0, 1.0, transition_steps=10)  # evaluated at count 0: 2.0
  plain = cgfac.scale_by_cgfac(1e-2, solver=solver, tol=1e-6, max_iters=30)
  x, _ = plain.update(grads, plain.init(params), params, layer_stats=stats)
  xg = np.dot(vec(x), vec(grads))
  for bound in (1e-4, 1e3):
    tx = cgfac.scale_by_cgfac(
      1e-2, solver=solver, tol=1e-6, max_iters=30, learning_rate=lr, kl_clip=bound
    )
    updates, state = tx.update(grads, tx.init(params), params, layer_stats=stats)
    factor = min(1.0, np.sqrt(bound / (4.0 * xg)))
    np.testing.assert_allclose(vec(updates), factor * vec(x), rtol=1e-5)
    np.testing.assert_allclose(float(state.control.clip), factor, rtol=1e-5)
  assert factor == 1.0  # the loose bound did not clip


@pytest.mark.parametrize(("solver", "slack"), [("eigh", 1e-4), ("cg", 1e-2)])
def test_kl_clip_bounds_the_measured_step_on_every_step(solver, slack):
  # The step the chain takes before momentum is -lr x; its Fisher norm is measured from the
  # explicit factors, independently of the <x, grad> the clip uses.
  lr, bound = 1.0, 1e-3
  pre = cgfac.scale_by_cgfac(1e-3, solver=solver, learning_rate=lr, kl_clip=bound)
  rest = optax.chain(optax.trace(0.9), optax.scale_by_learning_rate(lr))
  x_data, y_data = digits_mlp.digits()

  @jax.jit
  def step(params, pre_state, rest_state):
    _, grads, stats = digits_mlp.loss_grads_stats(params, x_data, y_data)
    x, pre_state = pre.update(grads, pre_state, params, layer_stats=stats)
    updates, rest_state = rest.update(x, rest_state, params)
    return optax.apply_updates(params, updates), pre_state, rest_state, x, stats

  params = digits_mlp.init(0)
  pre_state, rest_state = pre.init(params), rest.init(params)
  clips = []
  for _ in range(12):
    params, pre_state, rest_state, x, stats = step(params, pre_state, rest_state)
    assert lr**2 * digits_mlp.fisher_norm(stats, x) <= bound * (1 + slack)
    clips.append(float(pre_state.control.clip))
  assert min(clips) < 0.5  # the bound was active


def test_cgfac_clips_by_default_and_kl_clip_none_turns_it_off():
  params, grads, stats, _ = layer()
  big = jax.tree.map(lambda t: 100 * t, grads)
  for kl_clip, clipped in ((1e-3, True), (None, False)):
    kwargs = {} if clipped else {"kl_clip": kl_clip}
    tx = cgfac.cgfac(learning_rate=1.0, damping=1e-2, **kwargs)
    _, state = tx.update(big, tx.init(params), params, layer_stats=stats)
    assert (float(state[0].control.clip) < 1) == clipped


def test_kl_clip_with_inject_hyperparams():
  # The learning rate and the default bound arrive as traced arrays.
  params, grads, stats, _ = layer()
  tx = optax.inject_hyperparams(cgfac.cgfac)(learning_rate=1.0, damping=1e-2)
  assert "kl_clip" in tx.init(params).hyperparams
  step = jax.jit(lambda s: tx.update(grads, s, params, layer_stats=stats))
  state = tx.init(params)
  _, state = step(state)
  clip_1 = float(state.inner_state[0].control.clip)
  state.hyperparams["learning_rate"] = jnp.asarray(0.25)
  updates, state = step(state)
  clip_quarter = float(state.inner_state[0].control.clip)
  assert clip_1 < 0.25  # active at both rates, so the factor scales as 1 / lr
  np.testing.assert_allclose(clip_quarter, 4 * clip_1, rtol=1e-3)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


# Levenberg-Marquardt adaptive damping.


def adaptive_step(options, value_fn, value=0.0, steps=1, lr=1.0, solver="eigh"):
  params, grads, stats, _ = layer()
  tx = cgfac.scale_by_cgfac(options, solver=solver, learning_rate=lr)
  state = tx.init(params)
  dampings = []
  for _ in range(steps):
    _, state = tx.update(grads, state, params, layer_stats=stats, value=value, value_fn=value_fn)
    dampings.append(float(state.control.damping))
  return dampings


def quadratic(curvature):
  """``L(theta) = <grad, theta> + curvature/2 theta^T F theta``: the K-FAC model, scaled."""
  _, grads, _, factors = layer()
  fisher = oracles.kron_matrix(*factors)
  b = vec(grads)

  def loss(p):
    theta = jnp.concatenate([p["dense"]["kernel"].ravel(), p["dense"]["bias"]])
    return jnp.dot(b, theta) + 0.5 * curvature * theta @ fisher @ theta

  return loss


def test_adaptive_damping_rises_after_a_bad_step():
  options = cgfac.AdaptiveDamping(initial=1e-2, interval=1)
  [damping] = adaptive_step(options, lambda p: 1.0)  # the loss went up from 0 to 1
  np.testing.assert_allclose(damping, 1e-2 / 0.95, rtol=1e-6)


@pytest.mark.parametrize(("curvature", "factor"), [(1.0, 0.95), (1.5, 1.0), (4.0, 1 / 0.95)])
def test_adaptive_damping_follows_the_reduction_ratio(curvature, factor):
  # On the exact quadratic model the ratio is 1 (good: lower); with 1.5x the curvature it is
  # about 1/2 (keep); with 4x the loss rises (bad: raise).
  options = cgfac.AdaptiveDamping(initial=1e-2, interval=1)
  [damping] = adaptive_step(options, quadratic(curvature))
  np.testing.assert_allclose(damping, 1e-2 * factor, rtol=1e-5)


def test_adaptive_damping_interval_and_bounds():
  options = cgfac.AdaptiveDamping(initial=1e-2, maximum=2e-2, decay=0.5, interval=2)
  dampings = adaptive_step(options, lambda p: 1.0, steps=4)
  # Adapted at counts 0 and 2 only, by 1 / 0.5^2, and never above the maximum.
  np.testing.assert_allclose(dampings, [2e-2, 2e-2, 2e-2, 2e-2], rtol=1e-6)
  options = cgfac.AdaptiveDamping(initial=1e-2, minimum=2e-3, decay=0.5, interval=1)
  dampings = adaptive_step(options, quadratic(1.0), steps=3)
  np.testing.assert_allclose(dampings, [5e-3, 2.5e-3, 2e-3], rtol=1e-5)


def test_adaptive_damping_rises_when_the_probe_loss_is_not_finite():
  options = cgfac.AdaptiveDamping(initial=1e-2, interval=1)
  [damping] = adaptive_step(options, lambda p: jnp.nan)
  np.testing.assert_allclose(damping, 1e-2 / 0.95, rtol=1e-6)


def test_adaptive_damping_needs_value_and_value_fn():
  params, grads, stats, _ = layer()
  tx = cgfac.cgfac(learning_rate=0.1, damping=cgfac.AdaptiveDamping())
  state = tx.init(params)
  with pytest.raises(ValueError, match="adaptive damping needs value_fn"):
    tx.update(grads, state, params, layer_stats=stats, value=1.0)
  with pytest.raises(ValueError, match="adaptive damping needs params, value, value_fn"):
    tx.update(grads, state, layer_stats=stats)
  with pytest.raises(TypeError, match="value_fn must be a callable"):
    tx.update(grads, state, params, layer_stats=stats, value=1.0, value_fn=2.0)


def test_adaptive_damping_training_recipe_under_jit():
  options = cgfac.AdaptiveDamping(initial=1e-2, minimum=1e-4, maximum=1.0, interval=2)
  tx = cgfac.cgfac(learning_rate=0.1, damping=options)
  x, y = digits_mlp.digits()
  traces = []

  @jax.jit
  def train_step(params, opt_state):
    traces.append(1)
    loss, grads, stats = digits_mlp.loss_grads_stats(params, x, y)
    updates, opt_state = tx.update(
      grads,
      opt_state,
      params,
      layer_stats=stats,
      value=loss,
      value_fn=lambda p: digits_mlp.loss(p, x, y),
    )
    return optax.apply_updates(params, updates), opt_state, loss

  params = digits_mlp.init(0)
  opt_state = tx.init(params)
  losses, dampings = [], []
  for _ in range(10):
    params, opt_state, loss = train_step(params, opt_state)
    losses.append(float(loss))
    dampings.append(float(opt_state[0].control.damping))
  assert len(traces) == 1
  assert losses[-1] < 0.5 * losses[0]
  assert all(1e-4 <= d <= 1.0 for d in dampings)
  assert len(set(dampings)) > 1  # it adapted


# Options. (The state's stability under jit and lax.cond, adaptive damping included, is
# checked with every other option in tests/test_optax_battery.py.)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"kl_clip": 0.0, "learning_rate": 0.1}, "kl_clip must be None or > 0, got 0.0"),
    ({"kl_clip": 1e-3, "learning_rate": -1.0}, "learning_rate must be >= 0, got -1.0"),
    ({"kl_clip": 1e-3}, "kl_clip needs the learning rate"),
    ({"damping": cgfac.AdaptiveDamping()}, "adaptive damping needs the learning rate"),
  ],
)
def test_step_control_options_are_validated(kwargs, message):
  kwargs = {"damping": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=message):
    cgfac.scale_by_cgfac(kwargs.pop("damping"), **kwargs)


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"initial": 0.0}, r"AdaptiveDamping.initial must be a number > 0, got 0.0"),
    ({"minimum": 1.0}, r"minimum <= initial <= maximum, got 1.0, 0.001, 1000.0"),
    ({"decay": 1.0}, r"AdaptiveDamping.decay must be in \(0, 1\), got 1.0"),
    ({"interval": 0}, r"AdaptiveDamping.interval must be an int >= 1, got 0"),
  ],
)
def test_adaptive_damping_options_are_validated(kwargs, message):
  with pytest.raises(ValueError, match=message):
    cgfac.AdaptiveDamping(**kwargs)
