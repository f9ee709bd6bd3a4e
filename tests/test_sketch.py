"""The ``"sketch"`` solver: low-rank sketches of the averaged factors with an isotropic tail.

Oracles: the explicit float64 running average of the factors (the rule of
``cgfac_optax._memory``), its exact eigendecomposition, and an independent NumPy
recursion that truncates the ``d x d`` matrix ``beta * sketch + (1 - beta) * A_t`` to
its top ``k`` eigenpairs each step; solves against dense inverses of the sketched
factors with K-FAC's factored damping.
"""

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgfac_optax as cgfac
from cgfac_optax._solvers import sketch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

GAMMA = 0.05
DECAY = 0.8


def spectrum_rows(seed: int, rows: int, d: int, signal: int = 3):
  """Rows with a few strong directions and a weak isotropic rest, so truncation drops little."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))[0]
  scales = np.concatenate([np.linspace(4.0, 2.0, signal), np.full(d - signal, 0.1)])
  return rng.standard_normal((rows, d)) * scales @ basis.T


def numpy_sketch(factors_seen, k: int, decay: float = DECAY):
  """The truncated recursion, by ``d x d`` eigendecompositions; and the explicit average."""
  d = factors_seen[0].shape[0]
  q, lam, trace = np.zeros((d, min(k, d))), np.zeros(min(k, d)), 0.0
  average = np.zeros((d, d))
  for t, f in enumerate(factors_seen):
    beta = min(decay, t / (t + 1))
    e, v = np.linalg.eigh(beta * (q * lam) @ q.T + (1 - beta) * f)
    q, lam = v[:, -min(k, d) :], e[-min(k, d) :]
    trace = beta * trace + (1 - beta) * np.trace(f)
    average = beta * average + (1 - beta) * f
  sigma = 0.0 if k >= d else max(trace - lam.sum(), 0.0) / (d - k)
  return (q * (lam - sigma)) @ q.T + sigma * np.eye(d), average, lam


def run_sketch(steps: int, rank: int, d_in: int, d_out: int, **options):
  tx = cgfac.scale_by_cgfac(GAMMA, solver="sketch", sketch_rank=rank, **options)
  params = oracles.dense_layer(seed=100, d_in=d_in, d_out=d_out, lead=(7,), dtype=np.float64)[0]
  state = tx.init(params)
  update = jax.jit(tx.update)
  seen = []
  for t in range(steps):
    _, grads, stats = oracles.dense_layer(
      seed=100 + t, d_in=d_in, d_out=d_out, lead=(7,), dtype=np.float64
    )
    seen.append(oracles.factors(stats["dense"].inputs, stats["dense"].output_grads, bias=True))
    updates, state = update(grads, state, params, layer_stats=stats)
  return updates, state, grads, seen


def factored_damping_solve(big_a, big_g, v):
  pi = np.sqrt((np.trace(big_a) / big_a.shape[0]) / (np.trace(big_g) / big_g.shape[0]))
  root = np.sqrt(GAMMA)
  left = np.linalg.inv(big_a + pi * root * np.eye(big_a.shape[0]))
  right = np.linalg.inv(big_g + root / pi * np.eye(big_g.shape[0]))
  return left @ v @ right


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("rows", [5, 60])  # Gram of Y (k + rows <= d), else Y Y^T itself
def test_sketch_holding_every_direction_is_the_explicit_average(rows):
  d, k = 12, 12
  s = sketch.empty(d, k, jnp.float64)
  seen = []
  for t in range(4):
    x = spectrum_rows(t, rows, d)
    seen.append(0.5 * x.T @ x)
    s = sketch.update(s, jnp.asarray(x), 0.5, min(DECAY, t / (t + 1)))
  _, average, _ = numpy_sketch(seen, k)
  np.testing.assert_allclose(sketch.dense(s), average, rtol=1e-10, atol=1e-12)
  assert float(sketch.tail(s)) == 0.0


@pytest.mark.usefixtures("x64")
def test_truncated_sketch_bounds_the_average_and_keeps_its_trace():
  d, k, rows = 40, 6, 5
  s = sketch.empty(d, k, jnp.float64)
  seen = []
  for t in range(8):
    x = spectrum_rows(t, rows, d)
    seen.append(2.0 * x.T @ x)
    s = sketch.update(s, jnp.asarray(x), 2.0, min(DECAY, t / (t + 1)))
  expected, average, lam = numpy_sketch(seen, k)
  np.testing.assert_allclose(sketch.dense(s), expected, rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(float(s.trace), np.trace(average), rtol=1e-12)
  # The kept part never exceeds the average (a truncation of a PSD matrix at every step), so
  # each kept eigenvalue lies within the dropped mass of the average's own.
  kept = (np.asarray(s.q) * np.asarray(s.values)) @ np.asarray(s.q).T
  assert np.linalg.eigvalsh(average - kept).min() > -1e-10
  dropped = np.trace(average) - float(jnp.sum(s.values))
  top = np.linalg.eigvalsh(average)[::-1][:k]
  mine = np.sort(np.asarray(s.values))[::-1]
  assert np.all(mine <= top + 1e-10) and np.all(top - mine <= dropped + 1e-10)
  np.testing.assert_allclose(np.sort(lam)[::-1], mine, rtol=1e-9)
  # The three strong directions are found: their eigenvalues within 5% of the average's.
  np.testing.assert_allclose(mine[:3], top[:3], rtol=0.05)
  q = np.asarray(s.q)
  np.testing.assert_allclose(q.T @ q, np.eye(k), atol=1e-8)
  sigma = float(sketch.tail(s))
  np.testing.assert_allclose(sigma, dropped / (d - k), rtol=1e-12)
  assert sigma > 0


@pytest.mark.usefixtures("x64")
def test_solve_is_the_factored_damping_inverse_of_the_sketched_factors():
  d_a, d_g, k = 30, 20, 5
  sa, sg = sketch.empty(d_a, k, jnp.float64), sketch.empty(d_g, k, jnp.float64)
  for t in range(3):
    beta = min(DECAY, t / (t + 1))
    sa = sketch.update(sa, jnp.asarray(spectrum_rows(t, 6, d_a)), 0.3, beta)
    sg = sketch.update(sg, jnp.asarray(spectrum_rows(10 + t, 6, d_g)), 3.0, beta)
  v = np.random.default_rng(5).standard_normal((d_a, d_g))
  for damping in (GAMMA, 1e-6):
    data = sketch.prepare(sketch.SketchMemory(sa, sg), damping)
    big_a, big_g = np.asarray(sketch.dense(sa)), np.asarray(sketch.dense(sg))
    pi = np.sqrt((np.trace(big_a) / d_a) / (np.trace(big_g) / d_g))
    left = np.linalg.inv(big_a + pi * np.sqrt(damping) * np.eye(d_a))
    right = np.linalg.inv(big_g + np.sqrt(damping) / pi * np.eye(d_g))
    expected = left @ v @ right
    atol = 1e-10 * np.abs(expected).max()
    np.testing.assert_allclose(sketch.solve(data, jnp.asarray(v)), expected, rtol=1e-9, atol=atol)


@pytest.mark.usefixtures("x64")
def test_sketch_of_full_rank_is_kfac_inverse_refreshed_every_step():
  steps = 4
  mine, _, _, _ = run_sketch(steps, 64, 4, 3, curvature_decay=DECAY)
  tx = cgfac.scale_by_cgfac(GAMMA, solver="kfac_inverse", curvature_decay=DECAY, refresh_every=1)
  params = oracles.dense_layer(seed=100, d_in=4, d_out=3, lead=(7,), dtype=np.float64)[0]
  state = tx.init(params)
  for t in range(steps):
    _, grads, stats = oracles.dense_layer(
      seed=100 + t, d_in=4, d_out=3, lead=(7,), dtype=np.float64
    )
    theirs, state = tx.update(grads, state, params, layer_stats=stats)
  np.testing.assert_allclose(
    oracles.as_matrix(mine["dense"]), oracles.as_matrix(theirs["dense"]), rtol=1e-9, atol=1e-12
  )


@pytest.mark.usefixtures("x64")
def test_truncated_sketch_in_the_transform_solves_with_the_numpy_recursion():
  updates, state, grads, seen = run_sketch(5, 4, 30, 20, curvature_decay=DECAY)
  big_a, _, _ = numpy_sketch([f[0] for f in seen], 4)
  big_g, _, _ = numpy_sketch([f[1] for f in seen], 4)
  memory = state.curvature["dense"]
  assert memory.a.q.shape == (31, 4) and memory.g.q.shape == (20, 4)
  np.testing.assert_allclose(sketch.dense(memory.a), big_a, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(sketch.dense(memory.g), big_g, rtol=1e-8, atol=1e-10)
  expected = factored_damping_solve(big_a, big_g, oracles.as_matrix(grads["dense"]))
  np.testing.assert_allclose(oracles.as_matrix(updates["dense"]), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.usefixtures("x64")
def test_batch_only_sketch_keeps_no_memory_and_sketches_the_batch():
  updates, state, grads, seen = run_sketch(2, 4, 30, 20)
  assert state.curvature is None
  big_a, _, _ = numpy_sketch([seen[-1][0]], 4)
  big_g, _, _ = numpy_sketch([seen[-1][1]], 4)
  expected = factored_damping_solve(big_a, big_g, oracles.as_matrix(grads["dense"]))
  np.testing.assert_allclose(oracles.as_matrix(updates["dense"]), expected, rtol=1e-8, atol=1e-10)


def test_sketch_memory_is_linear_in_the_widths_and_compiles_once():
  tx = cgfac.scale_by_cgfac(GAMMA, solver="sketch", sketch_rank=8, curvature_decay=DECAY)
  params, grads, stats = oracles.dense_layer(d_in=40, d_out=30, lead=(7,))
  state = tx.init(params)
  update = jax.jit(tx.update)
  avals = lambda tree: jax.tree.map(lambda x: jax.typeof(x), tree)
  first = avals(state)
  for _ in range(3):
    updates, state = update(grads, state, params, layer_stats=stats)
  assert avals(state) == first and update._cache_size() == 1
  memory = state.curvature["dense"]
  sizes = [x.size for x in jax.tree.leaves(memory)]
  assert sum(sizes) == 41 * 8 + 8 + 1 + 30 * 8 + 8 + 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((updates, state)))


def test_sketch_rank_is_validated():
  with pytest.raises(ValueError, match=re.escape("sketch_rank must be an int >= 1, got 0")):
    cgfac.scale_by_cgfac(GAMMA, solver="sketch", sketch_rank=0)
  with pytest.raises(ValueError, match=re.escape("sketch_rank must be an int >= 1, got 2.5")):
    cgfac.cgfac(solver="sketch", sketch_rank=2.5)
  # It sets shapes: a traced value is refused with the way out, which works.
  params = oracles.dense_layer(d_in=40, d_out=30, lead=(7,))[0]
  traced = optax.inject_hyperparams(cgfac.scale_by_cgfac)(
    damping=GAMMA, solver="sketch", sketch_rank=8
  )
  with pytest.raises(ValueError, match=re.escape("static_args=('sketch_rank',)")):
    traced.init(params)
  tx = optax.inject_hyperparams(cgfac.scale_by_cgfac, static_args=("sketch_rank",))(
    damping=GAMMA, solver="sketch", sketch_rank=8, curvature_decay=DECAY
  )
  assert tx.init(params).inner_state.curvature["dense"].a.q.shape == (41, 8)
