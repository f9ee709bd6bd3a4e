"""``curvature_every``: the stats read, and averaged into the memory, on every T-th step only.

Oracles: the running average of the factors of the steps that read stats, written out by
hand; a counter of the stats function's runs (a host callback inside it runs only when the
compiled step takes the branch that reads them); and the same updates as reading every step
when the curvature does not change between reads.
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

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

DECAY = 0.9


def _steps(n, seed=0):
  """``n`` steps of a dense layer's (params, grads, stats), each drawn afresh."""
  return [oracles.dense_layer(seed + k, 5, 3, (8, 2)) for k in range(n)]


def _memory_tx(every, **options):
  return cgfac.scale_by_cgfac(
    0.1, solver="pcg", curvature_decay=DECAY, curvature_every=every, max_iters=2, **options
  )


def test_stats_are_computed_on_every_t_th_step_only():
  calls = []
  tx = _memory_tx(3)
  params, _, _ = _steps(1)[0]

  @jax.jit
  def step(grads, state, stats):
    def layer_stats():
      jax.debug.callback(lambda: calls.append(1))
      return stats

    return tx.update(grads, state, params, layer_stats=layer_stats)

  state = tx.init(params)
  for _, grads, stats in _steps(7):
    updates, state = step(grads, state, stats)
    jax.block_until_ready(updates)
  assert len(calls) == 3  # steps 0, 3 and 6
  assert step._cache_size() == 1


def test_memory_is_the_running_average_of_the_steps_that_read():
  tx = _memory_tx(3)
  steps = _steps(7)
  params = steps[0][0]
  state = tx.init(params)
  for _, grads, stats in steps:
    _, state = tx.update(grads, state, params, layer_stats=lambda stats=stats: stats)
  expected = None
  for update, k in enumerate((0, 3, 6)):  # the reading steps; beta_t = min(decay, t / (t + 1))
    batch = oracles.factors(steps[k][2]["dense"].inputs, steps[k][2]["dense"].output_grads, True)
    beta = min(DECAY, update / (update + 1))
    expected = (
      batch if expected is None else [beta * e + (1 - beta) * b for e, b in zip(expected, batch)]
    )  # noqa: E501
  kept = state.curvature["dense"].factors
  np.testing.assert_allclose(kept.a, expected[0], rtol=1e-5)
  np.testing.assert_allclose(kept.g, expected[1], rtol=1e-5)


def test_between_reads_the_steps_precondition_with_the_memory():
  """With the same stats at every step the average never changes: reading every third step
  gives the very updates of reading every step, while the gradients change."""
  params, _, stats = _steps(1)[0]
  grads = [g for _, g, _ in _steps(6, seed=10)]
  out = {}
  for every in (1, 3):
    tx, updates = _memory_tx(every), []
    state = tx.init(params)
    for g in grads:
      u, state = tx.update(g, state, params, layer_stats=lambda: stats)
      updates.append(u)
    out[every] = updates
  for a, b in zip(out[1], out[3]):
    np.testing.assert_allclose(a["dense"]["kernel"], b["dense"]["kernel"], rtol=2e-5, atol=1e-7)
  assert all(float(jnp.abs(u["dense"]["kernel"]).max()) > 0 for u in out[3])


def test_non_finite_stats_skip_the_reading_step_only():
  params, grads, stats = _steps(1)[0]
  bad = jax.tree.map(lambda x: jnp.asarray(x).at[0].set(jnp.nan), stats)
  tx = _memory_tx(2)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, layer_stats=lambda: stats)
  kept = state.curvature["dense"]
  u1, state = tx.update(grads, state, params, layer_stats=lambda: bad)  # not read
  u2, state = tx.update(grads, state, params, layer_stats=lambda: bad)  # read: skipped
  assert float(jnp.abs(u1["dense"]["kernel"]).max()) > 0
  assert float(jnp.abs(u2["dense"]["kernel"]).max()) == 0
  assert int(state.control.skipped["dense"]) == 1
  np.testing.assert_array_equal(state.curvature["dense"].factors.a, kept.factors.a)


def test_helpers_train_with_one_compiled_step(caplog):
  """cgfac(curvature_every=3) through the pure-JAX helper: one compilation for all steps."""
  key = jax.random.key(0)
  x = jax.random.normal(key, (64, 6))
  y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (6, 3)), -1)
  params = {
    "hidden": {"kernel": 0.3 * jax.random.normal(key, (6, 16)), "bias": jnp.zeros(16)},
    "out": {"kernel": 0.3 * jax.random.normal(jax.random.key(2), (16, 3)), "bias": jnp.zeros(3)},
  }
  apply = lambda p, x: (
    jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"]
    + p["out"]["bias"]
  )
  fn = cgfac.value_grad_and_extra(apply, loss="softmax_cross_entropy")
  tx = cgfac.cgfac(curvature_every=3)

  @jax.jit
  def train_step(params, state, key):
    loss, grads, extra = fn(params, x, y, key)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):
    for i in range(8):
      params, state, loss = train_step(params, state, jax.random.key(i))
      losses.append(float(loss))
      if i == 0:
        caplog.clear()
    assert not [r for r in caplog.records if re.search(r"compil.*train_step", r.getMessage())]
  assert losses[-1] < 0.8 * losses[0], losses


def test_errors():
  with pytest.raises(ValueError, match=r"curvature_every=3 reads the stats on every 3-th step"):
    cgfac.scale_by_cgfac(0.1, curvature_every=3)  # batch-only: nothing to use in between
  with pytest.raises(ValueError, match="curvature_every must be an int >= 1, got 0"):
    _memory_tx(0)
  with pytest.raises(ValueError, match="must be a Python int"):
    _memory_tx(jnp.asarray(3))
  params, grads, stats = _steps(1)[0]
  tx = cgfac.scale_by_cgfac(0.1, solver="cg", curvature_decay=DECAY, curvature_every=3)
  with pytest.raises(ValueError, match=r"keep no curvature memory.*\{'dense': 'cg'\}"):
    tx.update(grads, tx.init(params), params, layer_stats=stats)
  # cgfac()'s default follows the curvature: batch-only curvature reads every step.
  tx = cgfac.cgfac(curvature_decay=0.0, refresh_every=1)
  assert tx.init(params)[0].curvature is None
