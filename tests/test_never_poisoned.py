"""Never poisoned: one bad batch or option value, through the public API, for every solver.

Each case trains a model with Dense, Conv, LayerNorm, Embed and attention layers (Linen and
NNX; every solver preconditions one of its layers in each framework) for a few steps, feeds
one bad step in the middle (a NaN example, an infinite gradient, a NaN or negative damping,
inputs of 1e30) and then good batches again. After the bad step every parameter and every leaf
of the whole optimizer chain's state (momentum included) is finite; a step skipped as a whole
leaves the params, the momentum and the preconditioner's state exactly as they were, and counts
itself; and the loss after recovery matches a clean run within the effect of one skipped step.
"""

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

STEPS, BAD = 8, 3  # steps per run; the bad step's index
LR, DAMPING = 0.3, 0.1
LOSS = "softmax_cross_entropy"

# Case -> whether the whole step is skipped (else only the bad parts are: see check()).
CASES = {
  "nan_example": True,
  "inf_gradient": False,
  "nan_damping": True,
  "negative_damping": True,
  "huge_inputs": False,
}


# Models.


class FullLinen(nn.Module):
  """Conv, Embed (positions), LayerNorm, self-attention and Dense on ``(B, T, F)`` inputs."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, kernel_size=(2,))(x)
    h = h + nn.Embed(x.shape[1], 8)(jnp.arange(x.shape[1]))
    h = nn.LayerNorm()(jnp.tanh(h))
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(h)
    return nn.Dense(3)(h.mean(1))


class FullNNX(nnx.Module):
  """The same model in NNX (attention: ``nnx.MultiHeadAttention`` on ``nnx.LinearGeneral``)."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, kernel_size=(2,), rngs=rngs)
    self.embed = nnx.Embed(4, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs
    )
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = self.conv(x) + self.embed(jnp.arange(x.shape[1]))
    h = self.norm(jnp.tanh(h))
    h = h + self.attention(h)
    return self.head(h.mean(1))


def _data(shape):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  flat = x.reshape(shape[0], -1)
  y = jnp.argmax(flat @ jax.random.normal(kw, (flat.shape[1], 3)), axis=-1)
  return x, y


class Model:
  """A model in the functional form the steps need: params, loss, grads and stats."""

  def __init__(self, kind):
    self.kind = kind
    if kind == "nnx":
      self.x, self.y = _data((16, 4, 3))
      graphdef, params, rest = nnx.split(FullNNX(nnx.Rngs(0)), nnx.Param, ...)
      self.params = params
      self.module = lambda p: nnx.merge(graphdef, p, rest)
      self.apply = lambda p, x: self.module(p)(x)
    else:
      module = FullLinen()
      self.x, self.y = _data((16, 4, 3))
      self.params = jax.jit(module.init)(jax.random.key(1), self.x)["params"]
      self.apply = lambda p, x: module.apply({"params": p}, x)
      self.module = module

  def loss(self, params, x):
    return optax.softmax_cross_entropy_with_integer_labels(self.apply(params, x), self.y).mean()

  def value_grads_extra(self, params, x, curvature_batch_size):
    """The helper's ``(loss, grads, extra)``: curvature from the first ``curvature_batch_size``."""
    options = dict(loss=LOSS, fisher="empirical", curvature_batch_size=curvature_batch_size)
    if self.kind == "nnx":
      return cflax.nnx_value_grad_and_extra(self.module(params), x, self.y, **options)
    return cflax.value_grad_and_extra(self.module, **options)(params, x, self.y)


@functools.cache
def _model(kind):
  return Model(kind)


def _norm_scale(tree, kind):
  """The LayerNorm scale's leaf (a parameter without stats), by model kind."""
  return tree["norm"]["scale"] if kind == "nnx" else tree["LayerNorm_0"]["scale"]


# The runs: one compiled step per configuration, shared by its cases.


def _solvers(paths, shift):
  """Six consecutive solvers of the table (cyclically), over the model's six layers with stats."""
  names = list(SOLVERS)
  assert len(paths) == 6 <= len(names) <= 12
  return {p: names[(i + shift) % len(names)] for i, p in enumerate(paths)}


ATTENTION = ("query", "key", "value", "out")
LINEN_SOLVERS = _solvers(
  ["Conv_0", *(f"MultiHeadDotProductAttention_0/{p}" for p in ATTENTION), "Dense_0"], 0
)
NNX_SOLVERS = _solvers(["conv", *(f"attention/{p}" for p in ATTENTION), "head"], 6)
assert set(LINEN_SOLVERS.values()) | set(NNX_SOLVERS.values()) == set(SOLVERS)  # every one runs

# The configurations: (model, options of cgfac, adaptive mode).
CONFIGS = {
  "linen": ("linen", dict(solver=LINEN_SOLVERS, fallback="diagonal"), False),
  "nnx": ("nnx", dict(solver=NNX_SOLVERS, fallback="identity"), False),
  "linen_adaptive": ("linen", dict(solver="kfac_inverse", curvature_batch_size=8), True),
}


class Runner:
  def __init__(self, config):
    kind, options, adaptive = CONFIGS[config]
    self.model, self.kind, self.adaptive = _model(kind), kind, adaptive
    if adaptive:
      self.tx = cgfac.cgfac(**options)
    else:
      self.tx = optax.inject_hyperparams(cgfac.cgfac, static_args=("solver", "fallback"))(
        learning_rate=LR, damping=DAMPING, max_iters=5, **options
      )
    model, tx = self.model, self.tx

    # The adaptive mode's quadratic model on the 8 examples its factors see, as its option says.
    rows = options.get("curvature_batch_size")

    @jax.jit
    def step(params, state, x, inf_grad):
      _, grads, extra = model.value_grads_extra(params, x, rows)
      scale = _norm_scale(grads, kind)
      poisoned = jnp.where(inf_grad, jnp.inf, 0.0)
      if kind == "nnx":
        grads["norm"]["scale"] = scale.replace(scale[...].at[0].add(poisoned))
      else:
        grads["LayerNorm_0"]["scale"] = scale.at[0].add(poisoned)
      updates, state = tx.update(grads, state, params, **extra)
      return optax.apply_updates(params, updates), state

    self.step = step
    self.eval = jax.jit(model.loss)
    self.clean = self.run(model.params, tx.init(model.params), 0)

  def run(self, params, state, start, case=None):
    """``(params, state)`` after each step from ``start`` on, ``case`` at step ``BAD``."""
    out = []
    for i in range(start, STEPS):
      x, inf_grad = self.model.x, False
      if i == BAD and case == "nan_example":
        x = x.at[(0,) * x.ndim].set(jnp.nan)
      elif i == BAD and case == "huge_inputs":
        x = x * 1e30
      elif i == BAD and case == "inf_gradient":
        inf_grad = True
      if case in ("nan_damping", "negative_damping") and i in (BAD, BAD + 1):
        value = {BAD: jnp.nan if case == "nan_damping" else -DAMPING, BAD + 1: DAMPING}[i]
        damping = jnp.full_like(state.hyperparams["damping"], value)
        state = state._replace(hyperparams={**state.hyperparams, "damping": damping})
      params, state = self.step(params, state, x, inf_grad)
      out.append((params, state))
    return out


@functools.cache
def _runner(config):
  return Runner(config)


def _inner(state, adaptive):
  """The chain's states: ``(scale_by_cgfac's, momentum's or None)``."""
  chain = state if adaptive else state.inner_state
  return chain[0], (None if adaptive else chain[1])


def _assert_finite(tree, what):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (what, jax.tree_util.keystr(path))


def _assert_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def check(runner, case):
  clean = runner.clean
  before_params, before_state = clean[BAD - 1]
  bad = runner.run(before_params, before_state, BAD, case)
  params, state = bad[0]
  _assert_finite(params, "params")
  # The whole chain's state; an injected option keeps the value it was given.
  _assert_finite(state if runner.adaptive else state.inner_state, "optimizer state")
  cg_state, momentum = _inner(state, runner.adaptive)
  cg_before, momentum_before = _inner(before_state, runner.adaptive)
  skipped = int(cg_state.control.skipped_steps) - int(cg_before.control.skipped_steps)
  # With cgfac() one step spans every parameter: a non-finite gradient anywhere skips it whole.
  if CASES[case] or (runner.adaptive and case == "inf_gradient"):
    # Skipped as a whole: nothing moved, the momentum did not see the step, and it is counted.
    assert skipped == 1
    _assert_equal(params, before_params)
    if momentum is not None:
      _assert_equal(momentum, momentum_before)
    for field in ("solution", "fallback_moment", "curvature", "previous_update", "coefficients"):
      _assert_equal(getattr(cg_state, field), getattr(cg_before, field))
    assert int(cg_state.count) == int(cg_before.count) + 1  # schedules move on
  elif case == "inf_gradient":
    # Only the parameter with the infinite gradient (no stats: the fallback) is skipped.
    assert skipped == 0
    assert int(cg_state.control.fallback_skipped) == int(cg_before.control.fallback_skipped) + 1
    if cg_state.fallback_moment is not None:
      _assert_equal(
        _norm_scale(cg_state.fallback_moment, runner.kind),
        _norm_scale(cg_before.fallback_moment, runner.kind),
      )
  for p, s in bad[1:]:
    _assert_finite((p, s), "after recovery")
  assert runner.step._cache_size() == 1  # every case runs the one compiled step
  # Recovery: within the effect of one skipped step of the clean run.
  losses = [float(runner.eval(p, runner.model.x)) for p, _ in clean]
  final = float(runner.eval(bad[-1][0], runner.model.x))
  progress = losses[0] - losses[-1]
  assert progress > 0, losses
  assert losses[-1] - 0.1 * progress <= final <= losses[-2] + 0.1 * progress, (final, losses)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", ["linen", "nnx"])
def test_every_solver_and_fallback_survives(config, case):
  check(_runner(config), case)


@pytest.mark.parametrize("case", ["nan_example", "inf_gradient", "huge_inputs"])
def test_adaptive_cgfac_survives(case):
  # cgfac(): step sizes from the quadratic model, adaptive damping, curvature memory.
  check(_runner("linen_adaptive"), case)


# Options: refused when they would silently do nothing, checked inside the step when traced.


def _layer(seed=0):
  params, grads, stats = oracles.dense_layer(seed, 3, 2, (6,))
  return jax.tree.map(jnp.asarray, (params, grads, stats))


def test_options_that_would_do_nothing_or_diverge_are_refused():
  with pytest.raises(ValueError, match=r"tol must be < 1 \(CG stops before its first iteration"):
    cgfac.cgfac(0.1, tol=1.0)
  with pytest.raises(ValueError, match=r"momentum must be None or a float in \[0, 1\), got 1.5"):
    cgfac.cgfac(0.1, momentum=1.5)
  with pytest.raises(ValueError, match=r"momentum must be .* got -0.1"):
    cgfac.cgfac(0.1, momentum=-0.1)
  with pytest.raises(ValueError, match="learning_rate must be > 0 with adaptive damping, got 0"):
    cgfac.cgfac(0, cgfac.AdaptiveDamping())
  with pytest.raises(ValueError, match="learning_rate must be >= 0, got -0.1"):
    cgfac.cgfac(-0.1)


def test_zero_learning_rate_and_numpy_ints_are_accepted():
  params, grads, stats = _layer()
  tx = cgfac.cgfac(0.0, 0.1, max_iters=np.int64(3), curvature_batch_size=np.int64(4))
  update = jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=stats))
  updates, state = update(grads, tx.init(params))
  assert all(not np.any(u) for u in jax.tree.leaves(updates))  # lr 0: nothing moves
  assert int(state[0].iterations["dense"]) > 0  # but the solve ran
  assert int(state[0].control.skipped_steps) == 0


# A traced option's bad value -> the step is skipped whole; a good value trains again.
BAD_TRACED = [
  ("tol", -0.5),  # CG would "converge" at once: a silent no-op
  ("tol", 1.0),
  ("damping", 0.0),
  ("damping", jnp.nan),
  ("learning_rate", jnp.nan),
  ("learning_rate", -0.1),
  ("momentum", 1.5),
  ("momentum", jnp.nan),
]


@functools.cache
def _injected():
  tx = optax.inject_hyperparams(cgfac.cgfac, static_args=("solver",))(
    learning_rate=0.1, damping=0.1, momentum=0.5, tol=1e-3, solver="cg"
  )
  return tx, jax.jit(lambda g, s, p, st: tx.update(g, s, p, layer_stats=st))


@pytest.mark.parametrize(("name", "value"), BAD_TRACED)
def test_bad_traced_option_skips_the_step(name, value):
  params, grads, stats = _layer()
  tx, update = _injected()
  _, state = update(grads, tx.init(params), params, stats)
  good = state.hyperparams[name]
  bad = {**state.hyperparams, name: jnp.full_like(good, value)}
  updates, after = update(grads, state._replace(hyperparams=bad), params, stats)
  assert all(not np.any(u) for u in jax.tree.leaves(updates))
  assert int(after.inner_state[0].control.skipped_steps) == 1
  _assert_equal(after.inner_state[1], state.inner_state[1])  # the momentum did not see it
  _assert_equal(after.inner_state[0].solution, state.inner_state[0].solution)
  _assert_finite(after.inner_state, "optimizer state")
  updates, after = update(grads, after._replace(hyperparams=state.hyperparams), params, stats)
  assert all(np.any(u) for u in jax.tree.leaves(updates))
  assert int(after.inner_state[0].control.skipped_steps) == 1
  assert update._cache_size() == 1


def test_multi_steps_uses_the_mean_gradient_and_the_last_micro_batch_curvature():
  # optax.MultiSteps runs the inner update on every micro-step and keeps the last one's: the
  # step preconditions the mean gradient with the last micro-batch's stats (docs/recipes.md).
  params, grads, stats = _layer(0)
  _, grads2, stats2 = _layer(1)
  inner = cgfac.cgfac(0.1, 1e-2, solver="eigh")
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  update = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
  _, state = update(grads, tx.init(params), stats)
  got, state = update(grads2, state, stats2)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, grads2)
  solve = jax.jit(lambda st: inner.update(mean, inner.init(params), params, layer_stats=st)[0])
  last, first = solve(stats2), solve(stats)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8), got, last)
  assert not np.allclose(got["dense"]["kernel"], first["dense"]["kernel"], rtol=1e-3)
