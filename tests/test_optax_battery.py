"""The battery every optax transformation passes: jit, chain, inject_hyperparams, MultiSteps,
``lax.cond``, dtypes, schedules."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgfac_optax as cgfac
from cgfac_optax._solvers import SOLVERS


def _problem(dtype=jnp.float32, batch=6, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  params = {
    "Dense_0": {"kernel": normal(4, 3), "bias": jnp.zeros(3, dtype)},
    "Dense_1": {"kernel": normal(3, 2)},
  }
  grads = jax.tree.map(lambda p: normal(*p.shape), params)
  stats = {
    "Dense_0": cgfac.DenseStats(normal(batch, 4), normal(batch, 3)),
    "Dense_1": cgfac.DenseStats(normal(batch, 3), normal(batch, 2)),
  }
  return params, grads, stats


def _damped(grads, params, stats, damping):
  """The exact preconditioned gradient at a fixed damping."""
  tx = cgfac.scale_by_cgfac(damping, solver="lowrank")
  return tx.update(grads, tx.init(params), params, layer_stats=stats)[0]


def _close(got, want, rtol=1e-4, atol=0.0):
  """Leafwise ``||got - want|| <= rtol ||want|| + atol``: float32 solves at condition ~1e3 differ
  elementwise by rounding (jit vs eager fuse differently), not in norm."""

  def check(g, w):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert g.shape == w.shape
    assert np.linalg.norm(g - w) <= rtol * np.linalg.norm(w) + atol, (g, w)

  jax.tree.map(check, got, want)


def test_inside_chain_with_unknown_extra_args():
  params, grads, stats = _problem()
  alone = cgfac.scale_by_cgfac(1e-2, solver="lowrank")
  want, _ = alone.update(grads, alone.init(params), params, layer_stats=stats)
  # scale_by_cgfac ignores extra args it does not know ...
  got, _ = alone.update(grads, alone.init(params), params, layer_stats=stats, loss=jnp.ones(()))
  _close(got, want)
  # ... and so does the chain, through a transformation that takes none.
  tx = optax.chain(optax.clip_by_global_norm(1e9), alone, optax.scale(-0.5))
  got, _ = jax.jit(tx.update)(
    grads, tx.init(params), params, layer_stats=stats, loss=jnp.ones(()), rng=jax.random.key(0)
  )
  _close(got, jax.tree.map(lambda u: -0.5 * u, want))


def test_inject_hyperparams_scale_by_cgfac():
  params, grads, stats = _problem()
  tx = optax.inject_hyperparams(cgfac.scale_by_cgfac)(damping=1e-2, solver="lowrank")
  update = jax.jit(tx.update)
  state = tx.init(params)
  assert set(state.hyperparams) >= {"damping", "max_iters", "tol"}
  got, state = update(grads, state, params, layer_stats=stats)
  _close(got, _damped(grads, params, stats, 1e-2))
  # A new damping, set in the state, is used without recompiling.
  state.hyperparams["damping"] = jnp.asarray(0.5, jnp.float32)
  got, state = update(grads, state, params, layer_stats=stats)
  _close(got, _damped(grads, params, stats, 0.5))
  assert update._cache_size() == 1


def test_inject_hyperparams_injected_iteration_bound():
  params, grads, stats = _problem()
  tx = optax.inject_hyperparams(cgfac.scale_by_cgfac)(damping=1e-3, max_iters=1, tol=0.0)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(grads, state, params, layer_stats=stats)
  assert [int(v) for v in state.inner_state.iterations.values()] == [1, 1]
  state.hyperparams["max_iters"] = jnp.asarray(3, state.hyperparams["max_iters"].dtype)
  _, state = update(grads, state, params, layer_stats=stats)
  assert [int(v) for v in state.inner_state.iterations.values()] == [3, 3]


def test_inject_hyperparams_static_curvature_batch_size():
  params, grads, stats = _problem()
  tx = optax.inject_hyperparams(cgfac.scale_by_cgfac, static_args="curvature_batch_size")(
    damping=1e-2, solver="eigh", curvature_batch_size=3
  )
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  plain = cgfac.scale_by_cgfac(1e-2, solver="eigh")
  first = {n: cgfac.DenseStats(s.inputs[:3], s.output_grads[:3]) for n, s in stats.items()}
  want, _ = plain.update(grads, plain.init(params), params, layer_stats=first)
  _close(got, want)


@pytest.mark.parametrize("momentum", [0.9, None])
def test_inject_hyperparams_alias(momentum):
  params, grads, stats = _problem()
  tx = optax.inject_hyperparams(cgfac.cgfac)(
    learning_rate=0.1, damping=1e-2, momentum=momentum, solver="lowrank", kl_clip=None
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  got, state = update(grads, state, params, layer_stats=stats)
  plain = cgfac.cgfac(0.1, 1e-2, momentum=momentum, solver="lowrank", kl_clip=None)
  want, _ = plain.update(grads, plain.init(params), params, layer_stats=stats)
  _close(got, want)
  # Learning rate and damping both injected: change them and compare to a fresh alias.
  state.hyperparams["learning_rate"] = jnp.asarray(0.3, jnp.float32)
  state.hyperparams["damping"] = jnp.asarray(0.2, jnp.float32)
  got, state = update(grads, state, params, layer_stats=stats)
  first = _damped(grads, params, stats, 1e-2)
  second = _damped(grads, params, stats, 0.2)
  # Heavy ball: m2 = second + momentum * first; update = -lr * m2.
  mom = momentum or 0.0
  _close(got, jax.tree.map(lambda f, s: -0.3 * (s + mom * f), first, second))
  assert update._cache_size() == 1


def test_alias_is_the_documented_chain():
  params, grads, stats = _problem()
  tx = cgfac.cgfac(0.1, 1e-2, momentum=0.5, solver="eigh", max_iters=4, tol=1e-4)
  ref = optax.chain(
    cgfac.scale_by_cgfac(
      1e-2, solver="eigh", max_iters=4, tol=1e-4, learning_rate=0.1, kl_clip=1e-3
    ),
    optax.trace(decay=0.5),
    optax.scale_by_learning_rate(0.1),
  )
  s1, s2 = tx.init(params), ref.init(params)
  for _ in range(2):
    u1, s1 = tx.update(grads, s1, params, layer_stats=stats)
    u2, s2 = ref.update(grads, s2, params, layer_stats=stats)
    _close(u1, u2, rtol=1e-6)
  # No momentum: no trace in the chain.
  assert len(cgfac.cgfac(0.1, momentum=0).init(params)) == 2
  assert len(cgfac.cgfac(0.1, momentum=None).init(params)) == 2


def test_multi_steps_accumulates_then_applies():
  params, grads, stats = _problem()
  grads2 = jax.tree.map(lambda g: -0.5 * g + 1.0, grads)
  inner = cgfac.cgfac(0.1, 1e-2, solver="lowrank")
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  first, state = update(grads, state, params, layer_stats=stats)
  _close(first, jax.tree.map(jnp.zeros_like, params))
  second, state = update(grads2, state, params, layer_stats=stats)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, grads, grads2)
  want, _ = inner.update(mean, inner.init(params), params, layer_stats=stats)
  _close(second, want)
  assert int(state.inner_opt_state[0].count) == 1
  assert update._cache_size() == 1


def _with_uncovered(params, grads):
  """Adds parameters without stats for the fallback: a norm's scale, an embedding, and a leaf
  beside a layer's kernel and bias."""
  params = {**params, "norm": {"scale": jnp.ones(3)}, "embed": {"embedding": jnp.zeros((5, 2))}}
  grads = {**grads, "norm": {"scale": jnp.full(3, 0.5)}, "embed": {"embedding": jnp.ones((5, 2))}}
  params["Dense_0"] = {**params["Dense_0"], "extra": jnp.zeros(4)}
  grads["Dense_0"] = {**grads["Dense_0"], "extra": jnp.full(4, -0.25)}
  return params, grads


# What the state carries varies with the options: every solver's warm start and counters, the
# "diagonal" fallback's moment (or none with "identity"), the clip factor of kl_clip, the damping
# that adaptive damping changes, momentum in the alias's chain.
STATE_CASES = {
  **{s: dict(solver=s) for s in SOLVERS},
  "identity_fallback": dict(fallback="identity"),
  "adaptive_damping": dict(damping=cgfac.AdaptiveDamping(initial=1e-2, interval=1)),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_is_stable_through_cond_and_jit(case, caplog):
  """The state that comes out goes back in: same tree, shapes, dtypes and weak types (what
  ``lax.cond`` demands of its branches), and a jitted step compiles once."""
  params, grads = _with_uncovered(*_problem()[:2])
  _, _, stats = _problem()
  options = {"damping": 1e-2, **STATE_CASES[case]}
  tx = cgfac.cgfac(0.1, options.pop("damping"), **options)
  extra = {}
  if case == "adaptive_damping":
    loss = lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p))
    extra = {"value": loss(params), "value_fn": loss}
  state = tx.init(params)

  def update(grads, state):
    return tx.update(grads, state, params, layer_stats=stats, **extra)

  # lax.cond needs both branches to give the same tree of shapes, dtypes and weak types.
  step = lambda s: update(grads, s)[1]
  new_state = jax.jit(lambda s, p: jax.lax.cond(p, step, lambda s: s, s))(state, True)
  types = lambda tree: jax.tree.map(
    lambda x: (jax.typeof(x).shape, jax.typeof(x).dtype, jax.typeof(x).weak_type), tree
  )
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  assert types(new_state) == types(state)
  assert int(new_state[0].count) == 1  # the step branch ran

  # New values, same shapes: the state that came out goes back in without a new trace, as the
  # jit cache and JAX's compile log both show.
  @jax.jit
  def train_step(grads, state):
    return update(grads, state)

  compiled = lambda: [
    r for r in caplog.records if re.search(r"compil.*jit\(train_step\)", r.getMessage())
  ]
  scaled = jax.tree.map(lambda g: 2.0 * g, grads)
  with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):
    outputs, state = [], tx.init(params)
    for g in (grads, scaled):
      updates, state = train_step(g, state)
      outputs.append(updates)
    assert compiled(), "the first call's compilation should be logged"
    caplog.clear()
    updates, state = train_step(grads, state)
    outputs.append(updates)
    assert not compiled(), caplog.text
  assert train_step._cache_size() == 1
  assert types(state) == types(tx.init(params))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(outputs))
  assert int(state[0].count) == 3


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_params_keep_their_dtype(solver):
  # One tree mixing float32, bfloat16 and float64 layers, with float64 stats, under x64: any
  # promotion, or a dtype leaking from one layer into another in the shared CG loop, would show.
  dtypes = {"Dense_0": jnp.float32, "Dense_1": jnp.bfloat16, "Dense_2": jnp.float64}
  params, grads, _ = _problem(dtype=jnp.float64)
  _, _, stats = _problem(dtype=jnp.float64, seed=1)
  params["Dense_2"] = jax.tree.map(lambda p: 0.5 * p, params["Dense_1"])
  grads["Dense_2"] = jax.tree.map(lambda g: -g, grads["Dense_1"])
  stats["Dense_2"] = stats["Dense_1"]
  cast = lambda tree: {n: optax.tree.cast(t, dtypes[n]) for n, t in tree.items()}
  params, grads = cast(params), cast(grads)
  tx = cgfac.cgfac(0.1, 1e-2, solver=solver)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, layer_stats=stats)
  cg_state = state[0]
  for name, dtype in dtypes.items():
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates[name]))
    assert all(s.dtype == dtype for s in jax.tree.leaves(cg_state.solution[name]))
    assert cg_state.iterations[name].dtype == jnp.int32
    assert cg_state.residual[name].dtype == jnp.float32
  assert cg_state.count.dtype == jnp.int32
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_float32_update_is_accurate():
  params, grads, stats = _problem()
  tx = cgfac.scale_by_cgfac(1e-1, solver="cg", max_iters=50, tol=1e-5)
  got, state = jax.jit(tx.update)(grads, tx.init(params), params, layer_stats=stats)
  exact = cgfac.scale_by_cgfac(1e-1, solver="eigh")
  want, _ = exact.update(grads, exact.init(params), params, layer_stats=stats)
  _close(got, want, rtol=1e-3)
  assert all(float(r) <= 1e-5 for r in state.residual.values())


def test_damping_schedule():
  params, grads, stats = _problem()
  schedule = lambda count: 0.5 * 0.1**count
  tx = cgfac.scale_by_cgfac(schedule, solver="lowrank")
  update = jax.jit(tx.update)
  state = tx.init(params)
  for step in range(3):
    got, state = update(grads, state, params, layer_stats=stats)
    _close(got, _damped(grads, params, stats, 0.5 * 0.1**step), rtol=1e-4)
  assert update._cache_size() == 1
  # An optax schedule works the same way, inside the alias.
  tx = cgfac.cgfac(
    0.1, optax.exponential_decay(0.5, 1, 0.1), momentum=None, solver="lowrank", kl_clip=None
  )
  state = tx.init(params)
  for _ in range(2):
    got, state = tx.update(grads, state, params, layer_stats=stats)
  _close(got, jax.tree.map(lambda w: -0.1 * w, _damped(grads, params, stats, 0.05)), rtol=1e-4)
