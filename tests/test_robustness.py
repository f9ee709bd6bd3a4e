"""Bad inputs get clear errors or defined behaviour, and never poison the optimizer state."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgfac_optax as cgfac
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import digits_mlp  # noqa: E402
import oracles  # noqa: E402
from oracles import as_matrix  # noqa: E402


def problem(seed=0, d_in=3, d_out=2, rows=6, scale_a=1.0, scale_g=1.0, dtype=np.float32):
  """One dense layer ``"dense"`` with a bias: params, a consistent batch gradient and its stats."""
  return oracles.dense_layer(
    seed, d_in, d_out, (rows,), scale_a=scale_a, scale_g=scale_g, dtype=dtype
  )


def dense_solve(stats, grad_layer, damping):
  """The oracle: ``(A (x) G + damping I)^{-1} grad`` from the explicit Kronecker product."""
  return oracles.layer_solve(stats, grad_layer, damping)


def run_step(tx, params, grads, stats, state=None):
  # Eager on purpose: the small ops compile once for the whole module, a jit per test would not.
  state = tx.init(params) if state is None else state
  return tx.update(grads, state, params, layer_stats=stats)


def assert_finite_tree(tree):
  for leaf in jax.tree.leaves(tree):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), tree


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_zero_gradient_gives_zero_update(solver):
  params, grads, stats = problem()
  grads = jax.tree.map(np.zeros_like, grads)
  tx = cgfac.scale_by_cgfac(1e-3, solver=solver, learning_rate=0.1, kl_clip=1e-3)
  updates, state = run_step(tx, params, grads, stats)
  np.testing.assert_array_equal(as_matrix(updates["dense"]), 0)
  assert int(state.iterations["dense"]) == 0
  assert int(state.control.skipped["dense"]) == 0
  assert float(state.control.clip) == 1.0
  assert_finite_tree(state)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_all_zero_stats_give_the_damped_gradient(solver):
  # With F = 0 the system is gamma x = grad: defined for every solver, and solved exactly by
  # every exact one (an approximate solver, such as factored damping, answers otherwise).
  params, grads, stats = problem()
  stats = jax.tree.map(np.zeros_like, stats)
  updates, state = run_step(cgfac.scale_by_cgfac(1e-2, solver=solver), params, grads, stats)
  assert_finite_tree((updates, state))
  assert int(state.control.skipped["dense"]) == 0
  if SOLVERS[solver].exact:
    want = as_matrix(grads["dense"]) / 1e-2
    # A preconditioner made of float32 inverses (pcg's) adds its own rounding to CG's.
    rtol = 1e-5 if SOLVERS[solver].preconditioner is not None else 1e-6
    np.testing.assert_allclose(as_matrix(updates["dense"]), want, rtol)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_rank_deficient_stats_with_tiny_damping_stay_finite(solver):
  # Two rows for a 7 x 5 block: rank 2 of 35, condition number ~1e8 with damping 1e-8.
  params, grads, stats = problem(d_in=6, d_out=5, rows=2)
  tx = cgfac.scale_by_cgfac(1e-8, solver=solver, max_iters=50, tol=1e-6)
  updates, state = run_step(tx, params, grads, stats)
  assert_finite_tree((updates, state))
  assert int(state.control.skipped["dense"]) == 0
  if not SOLVERS[solver].exact:
    return  # finite is all an approximate solve promises
  x = as_matrix(updates["dense"])
  big_a, big_g = oracles.factors(stats["dense"].inputs, stats["dense"].output_grads, bias=True)
  fx = big_a @ x @ big_g + 1e-8 * x
  # The gradient lies in the range of F, so the range part of the answer is well conditioned.
  # pcg's float32 inverses of factors damped by only pi * 1e-4 have entries near 1e4: their
  # rounding (about 1e4 * eps) bounds how far its CG gets, where plain CG reaches 1e-3.
  b = as_matrix(grads["dense"])
  bound = 1e-2 if SOLVERS[solver].preconditioner is not None else 1e-3
  assert np.linalg.norm(fx - b) <= bound * np.linalg.norm(b)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_huge_and_tiny_gradients_are_solved_to_scale(solver, scale):
  # Unscaled, CG's ||b||^2 overflows (1e30) or underflows to a "zero" right-hand side (1e-30).
  params, grads, stats = problem()
  tx = cgfac.scale_by_cgfac(1e-2, solver=solver, max_iters=30, tol=1e-6)
  scaled = jax.tree.map(lambda t: (t.astype(np.float64) * scale).astype(np.float32), grads)
  updates, state = run_step(tx, params, scaled, stats)
  assert_finite_tree(state)
  # Every solver: the answer to the scaled gradient is the scaled answer.
  unscaled, _ = run_step(tx, params, grads, stats)
  expected = as_matrix(unscaled["dense"]) * scale
  np.testing.assert_allclose(as_matrix(updates["dense"]), expected, rtol=1e-4, atol=0)
  if SOLVERS[solver].exact:  # and it is the solve
    expected = dense_solve(stats["dense"], grads["dense"], 1e-2) * scale
    np.testing.assert_allclose(as_matrix(updates["dense"]), expected, rtol=1e-4, atol=0)


def test_huge_gradient_with_kl_clip_gives_the_bounded_step():
  # <x, grad> ~ 1e62 overflows float32; the clip factor is computed as a power of two apart.
  params, grads, stats = problem()
  scaled = jax.tree.map(lambda t: (t.astype(np.float64) * 1e30).astype(np.float32), grads)
  tx = cgfac.scale_by_cgfac(1e-2, solver="eigh", learning_rate=0.5, kl_clip=1e-3)
  updates, state = run_step(tx, params, scaled, stats)
  x = dense_solve(stats["dense"], grads["dense"], 1e-2) * 1e30
  xg = np.sum(x * as_matrix(scaled["dense"]))
  expected = x * np.sqrt(1e-3 / (0.25 * xg))
  np.testing.assert_allclose(as_matrix(updates["dense"]), expected, rtol=1e-4)
  assert 0 < float(state.control.clip) < 1e-20


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_huge_stats_give_a_zero_update_and_a_finite_state(solver):
  # A Fisher of size ~1e120 does not fit float32: the layer is not updated, nothing goes NaN.
  params, grads, stats = problem()
  stats = jax.tree.map(lambda t: t * np.float32(1e30), stats)
  updates, state = run_step(cgfac.scale_by_cgfac(1e-3, solver=solver), params, grads, stats)
  np.testing.assert_array_equal(as_matrix(updates["dense"]), 0)
  assert_finite_tree(state)


@pytest.mark.parametrize(("dtype", "solver"), [(jnp.float16, "cg"), (jnp.bfloat16, "lowrank")])
def test_half_precision_params_and_stats(dtype, solver):
  params, grads, stats = problem(dtype=np.float32)
  half = lambda t: jnp.asarray(t, dtype)
  params, grads, stats = (jax.tree.map(half, t) for t in (params, grads, stats))
  tx = cgfac.scale_by_cgfac(1e-2, solver=solver, max_iters=30, tol=1e-6)
  updates, state = run_step(tx, params, grads, stats)
  for tree in (updates, state.solution):
    assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
  assert state.residual["dense"].dtype == jnp.float32
  # The math runs in float32 on the half-precision values; only the result is rounded.
  up = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  stats64 = jax.tree.map(up, stats)
  expected = dense_solve(stats64["dense"], jax.tree.map(up, grads)["dense"], 1e-2)
  rtol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
  atol = rtol * np.abs(expected).max()
  np.testing.assert_allclose(up_matrix(updates), expected, rtol=rtol, atol=atol)


def up_matrix(updates):
  as_float32 = lambda t: np.asarray(jnp.asarray(t, jnp.float32))
  return as_matrix(jax.tree.map(as_float32, updates)["dense"])


def test_float32_params_with_bfloat16_stats():
  params, grads, stats = problem()
  stats_bf16 = jax.tree.map(lambda t: jnp.asarray(t, jnp.bfloat16), stats)
  updates, _ = run_step(cgfac.scale_by_cgfac(1e-2, solver="eigh"), params, grads, stats_bf16)
  assert updates["dense"]["kernel"].dtype == jnp.float32
  stats_rounded = jax.tree.map(lambda t: np.asarray(jnp.asarray(t, jnp.float32)), stats_bf16)
  expected = dense_solve(stats_rounded["dense"], grads["dense"], 1e-2)
  np.testing.assert_allclose(as_matrix(updates["dense"]), expected, rtol=1e-4, atol=1e-6)


def test_update_that_overflows_float16_skips_the_layer():
  # grad / damping ~ 1e7 is finite in float32 but not in float16 (max 65504).
  params, grads, stats = problem()
  stats = jax.tree.map(np.zeros_like, stats)
  half = lambda t: jnp.asarray(t, jnp.float16)
  params, grads, stats = (jax.tree.map(half, t) for t in (params, grads, stats))
  updates, state = run_step(cgfac.scale_by_cgfac(1e-7, solver="eigh"), params, grads, stats)
  np.testing.assert_array_equal(up_matrix(updates), 0)
  assert int(state.control.skipped["dense"]) == 1
  assert_finite_tree(state)


def test_mismatched_batch_sizes_are_a_clear_error():
  params, grads, stats = problem(rows=6)
  bad = {"dense": cgfac.DenseStats(stats["dense"].inputs, stats["dense"].output_grads[:5])}
  tx = cgfac.scale_by_cgfac(1e-3)
  with pytest.raises(ValueError, match=r"layer 'dense': inputs \(6, 3\) and output_grads \(5, 2\)"):
    tx.update(grads, tx.init(params), params, layer_stats=bad)


def two_layers(seed=0):
  p1, g1, s1 = problem(seed, d_in=3, d_out=4)
  p2, g2, s2 = problem(seed + 1, d_in=4, d_out=2)
  rename = lambda t1, t2: {"first": t1["dense"], "second": t2["dense"]}
  return rename(p1, p2), rename(g1, g2), rename(s1, s2)


# A non-finite solve is caught for every solver; non-finite inputs are caught before any solver.
BAD_LAYER_CASES = [("stats", "cg"), ("gradient", "eigh")] + [("solve", s) for s in SOLVERS]


@pytest.mark.parametrize(("where", "solver"), BAD_LAYER_CASES)
def test_non_finite_layer_is_skipped_and_its_warm_start_reset(where, solver):
  params, grads, stats = two_layers()
  tx = cgfac.scale_by_cgfac(1e-2, solver=solver, learning_rate=1.0, kl_clip=1e-2)
  step = lambda g, s, st: tx.update(g, s, params, layer_stats=st)
  _, state = step(grads, tx.init(params), stats)
  assert np.any(as_matrix(state.solution["first"]) != 0)

  bad_grads, bad_stats = grads, dict(stats)
  a, g = np.array(stats["first"].inputs), np.array(stats["first"].output_grads)
  if where == "stats":
    a[2] = np.nan  # one NaN row
    bad_stats["first"] = cgfac.DenseStats(a, g)
  elif where == "gradient":
    bad_grads = jax.tree.map(np.array, grads)
    bad_grads["first"]["bias"][0] = np.inf
  else:  # finite inputs whose curvature overflows: the solve itself is not finite
    bad_stats["first"] = cgfac.DenseStats(a * 1e25, g * 1e25)
  updates, state = step(bad_grads, state, bad_stats)

  assert_finite_tree((updates, state))
  np.testing.assert_array_equal(as_matrix(updates["first"]), 0)
  np.testing.assert_array_equal(as_matrix(state.solution["first"]), 0)
  # Counted for every solver, CG included: the overflowing operator makes its residual NaN.
  assert int(state.control.skipped["first"]) == 1
  assert int(state.iterations["first"]) == 0 and float(state.residual["first"]) == 1.0
  assert int(state.control.skipped["second"]) == 0
  # The other layer is solved as if the bad one had no stats at all.
  alone = {"second": stats["second"]}
  tx_alone = cgfac.scale_by_cgfac(1e-2, solver=solver, learning_rate=1.0, kl_clip=1e-2)
  expected, _ = run_step(tx_alone, params, grads, alone)
  np.testing.assert_allclose(
    as_matrix(updates["second"]), as_matrix(expected["second"]), rtol=1e-4, atol=1e-7
  )


def test_non_finite_damping_skips_every_layer():
  params, grads, stats = two_layers()
  tx = cgfac.scale_by_cgfac(lambda count: jnp.where(count == 1, jnp.nan, 1e-2))
  step = lambda g, s, st: tx.update(g, s, params, layer_stats=st)
  _, state = step(grads, tx.init(params), stats)
  updates, state = step(grads, state, stats)
  assert_finite_tree((updates, state))
  assert all(int(v) == 1 for v in state.control.skipped.values())
  updates, state = step(grads, state, stats)  # and recovers
  assert all(np.any(as_matrix(u) != 0) for u in updates.values())


def train(tx, steps, inject_at):
  """Losses and (state, update) per step of a clean run and of one with NaN stats at a step."""
  x, y = digits_mlp.digits()

  @jax.jit
  def step(params, state, poison):
    loss, grads, stats = digits_mlp.loss_grads_stats(params, x, y)
    a = stats["layer0"].inputs
    a = a.at[3].set(jnp.where(poison, jnp.nan, a[3]))  # one NaN row on demand
    stats["layer0"] = cgfac.DenseStats(a, stats["layer0"].output_grads)
    updates, state = tx.update(grads, state, params, layer_stats=stats)
    return optax.apply_updates(params, updates), state, loss, updates

  def run(inject_at):
    params = digits_mlp.init(0)
    state = tx.init(params)
    losses, states = [], []
    for i in range(steps):
      params, state, loss, updates = step(params, state, i == inject_at)
      losses.append(float(loss))
      states.append((state, updates))
    return np.array(losses), states

  return run(None), run(inject_at)


def test_training_survives_nan_stats_and_reaches_the_same_loss():
  tx = cgfac.cgfac(learning_rate=0.1, damping=1e-3)
  (clean, _), (poisoned, states) = train(tx, 25, inject_at=8)
  inner = lambda s: s[0]  # the scale_by_cgfac state inside the chain
  state8, updates8 = states[8]
  # The skipped layer's preconditioned step is zero: the chain's update is the decayed momentum.
  np.testing.assert_allclose(
    as_matrix(updates8["layer0"]), 0.9 * as_matrix(states[7][1]["layer0"]), rtol=1e-6
  )
  assert int(inner(state8).control.skipped["layer0"]) == 1
  assert int(inner(state8).control.skipped["layer1"]) == 0
  np.testing.assert_array_equal(as_matrix(inner(state8).solution["layer0"]), 0)
  for state, updates in states:
    assert_finite_tree((state, updates))
  assert poisoned[-1] < 0.5 * clean[0]
  assert abs(poisoned[-1] - clean[-1]) < 0.05 + 0.5 * clean[-1]


def test_inside_apply_if_finite():
  params, grads, stats = two_layers()
  only_second = {"second": stats["second"]}  # "first" has no stats: it passes through
  tx = optax.apply_if_finite(cgfac.cgfac(0.1, 1e-2), max_consecutive_errors=3)
  step = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
  _, state = step(grads, tx.init(params), only_second)

  a = np.array(stats["second"].inputs)
  a[0, 0] = np.nan
  updates, state = step(grads, state, {"second": cgfac.DenseStats(a, stats["second"].output_grads)})
  # The bad layer is skipped inside, so the update is finite and applied.
  assert_finite_tree((updates, state))
  assert int(state.notfinite_count) == 0
  assert int(state.inner_state[0].control.skipped["second"]) == 1

  bad_grads = jax.tree.map(np.array, grads)
  bad_grads["first"]["kernel"][0, 0] = np.nan
  before = state
  updates, state = step(bad_grads, state, only_second)
  # A non-finite gradient without stats reaches the wrapper, which drops the step.
  assert int(state.notfinite_count) == 1
  np.testing.assert_array_equal(as_matrix(updates["second"]), 0)
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, before.inner_state)


def test_kernel_shape_must_split_into_the_stats_widths():
  # A conv kernel (3, 3, 4, 8) is 36 inputs by 8 outputs: stats of widths 72 and 4 have the
  # same element count but no split of the kernel's axes gives them.
  params = {"conv": {"kernel": jnp.zeros((3, 3, 4, 8))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = cgfac.scale_by_cgfac(1e-3)
  bad = {"conv": cgfac.DenseStats(jnp.ones((5, 72)), jnp.ones((5, 4)))}
  with pytest.raises(ValueError, match=r"layer 'conv': kernel shape \(3, 3, 4, 8\) does not match"):
    tx.update(grads, tx.init(params), params, layer_stats=bad)
  # The split that fits, and one over several output axes (nnx.LinearGeneral), are accepted.
  for kernel, d_in, d_out in (((3, 3, 4, 8), 36, 8), ((6, 2, 3), 6, 6), ((2, 3, 4), 2, 12)):
    p = {"layer": {"kernel": jnp.zeros(kernel)}}
    stats = {"layer": cgfac.DenseStats(jnp.ones((5, d_in)), jnp.ones((5, d_out)))}
    update = lambda g, s, st, p=p: tx.update(g, s, p, layer_stats=st)
    updates, _ = jax.eval_shape(update, p, tx.init(p), stats)
    assert updates["layer"]["kernel"].shape == kernel


# The exact powers of two that scale every right-hand side, built from their bits: the same
# numbers as NumPy's ldexp and frexp wherever the result is a normal number.


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_powers_of_two_match_ldexp_and_frexp(dtype, request):
  if dtype == "float64":
    request.getfixturevalue("x64")
  from cgfac_optax import _finite

  info = np.finfo(dtype)
  xs = np.array([1.0, -3.5, 1e-3, 7.25], dtype)
  for e in range(-3 * (info.maxexp + 30), 3 * (info.maxexp + 30), 5):
    got = np.asarray(_finite.times_pow2(jnp.asarray(xs), e))
    with np.errstate(over="ignore"):
      want = np.ldexp(xs, e).astype(dtype)
    normal = np.isfinite(want) & (np.abs(want) >= info.smallest_normal)
    np.testing.assert_array_equal(got[normal], want[normal])
    assert np.all(np.isinf(got[np.isinf(want)]))
  rng = np.random.default_rng(0)
  extremes = [
    0.0,
    info.smallest_subnormal,
    info.smallest_normal / 3,
    info.smallest_normal,
    info.max,
  ]
  values = np.concatenate([extremes, 10.0 ** rng.uniform(-30, 30, 200)]).astype(dtype)
  got = [int(_finite.exponent_of(jnp.asarray(v))) for v in values]
  assert got == [int(np.frexp(v)[1]) for v in values]
