"""Parameters without curvature stats: the "diagonal", "identity" and "error" fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac


def _setup(steps=3):
  """A dense layer with stats, plus a LayerNorm-like dict and an embedding without."""
  key = jax.random.key(0)
  params = {
    "dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2), "extra": jnp.zeros(4)},
    "norm": {"scale": jnp.ones(5), "bias": jnp.zeros(5)},
    "embed": {"embedding": jnp.zeros((6, 3))},
  }
  batches = []
  for t in range(steps):
    kx, kg, kr = jax.random.split(jax.random.fold_in(key, t), 3)
    x, g = jax.random.normal(kx, (8, 3)), jax.random.normal(kg, (8, 2))
    grads = jax.tree.map(lambda p, k=kr: jax.random.normal(k, p.shape) * 0.3, params)
    grads["dense"]["kernel"], grads["dense"]["bias"] = x.T @ g / 8, g.mean(0)
    batches.append((grads, {"dense": cgfac.DenseStats(x, g)}))
  return params, batches


UNCOVERED = ("dense/extra", "norm/scale", "norm/bias", "embed/embedding")


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _run(params, batches, **kwargs):
  tx = cgfac.scale_by_cgfac(0.05, solver="eigh", **kwargs)
  update = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))
  state, out = tx.init(params), []
  for grads, stats in batches:
    updates, state = update(grads, state, stats)
    out.append(updates)
  return out, state


def test_diagonal_is_a_damped_diagonal_fisher_with_bias_corrected_ema():
  params, batches = _setup()
  damping, decay = 0.05, 0.9
  out, state = _run(params, batches, fallback_decay=decay)
  for path in UNCOVERED:
    v = np.zeros(_leaf(params, path).shape)
    for t, (grads, _) in enumerate(batches, start=1):
      g = np.asarray(_leaf(grads, path), np.float64)
      v = decay * v + (1 - decay) * g * g
      expected = g / (v / (1 - decay**t) + damping)
      np.testing.assert_allclose(_leaf(out[t - 1], path), expected, rtol=1e-5)
    np.testing.assert_allclose(_leaf(state.fallback_moment, path), v, rtol=1e-5)
  # Covered parameters keep no moment and get the same update under every fallback.
  assert not np.any(state.fallback_moment["dense"]["kernel"])
  ident, ident_state = _run(params, batches, fallback="identity")
  np.testing.assert_array_equal(out[-1]["dense"]["kernel"], ident[-1]["dense"]["kernel"])
  np.testing.assert_array_equal(out[-1]["dense"]["bias"], ident[-1]["dense"]["bias"])
  assert ident_state.fallback_moment is None


def test_diagonal_step_is_bounded_by_the_damping():
  """``|u| <= |g| / gamma`` and ``|u| <= 1 / (2 sqrt(gamma (1 - beta)))``."""
  params = {"w": jnp.zeros(2000)}
  damping, decay = 1e-3, 0.95
  tx = cgfac.scale_by_cgfac(damping, fallback_decay=decay)
  state = tx.init(params)
  bound = 1 / (2 * np.sqrt(damping * (1 - decay)))
  worst = 0.0
  for t in range(5):
    scale = jnp.logspace(-4, 1, 2000)  # gradients from far below to far above sqrt(damping)
    g = {"w": scale * jax.random.normal(jax.random.key(t), (2000,))}
    u, state = tx.update(g, state, layer_stats={})
    assert np.all(np.abs(u["w"]) <= np.abs(g["w"]) / damping * (1 + 1e-6))
    worst = max(worst, float(np.max(np.abs(u["w"]))))
    if t == 0:
      assert worst <= 1 / (2 * np.sqrt(damping)) * (1 + 1e-6)
  assert worst <= bound * (1 + 1e-6)


def test_identity_passes_uncovered_gradients_through():
  params, batches = _setup(steps=1)
  out, _ = _run(params, batches, fallback="identity")
  for path in UNCOVERED:
    np.testing.assert_array_equal(_leaf(out[0], path), _leaf(batches[0][0], path))


def test_error_lists_every_uncovered_path():
  params, batches = _setup(steps=1)
  tx = cgfac.scale_by_cgfac(0.05, fallback="error")
  grads, stats = batches[0]
  with pytest.raises(ValueError, match="4 parameter") as info:
    tx.update(grads, tx.init(params), layer_stats=stats)
  for path in UNCOVERED:
    assert repr(path) in str(info.value)
  covered = {"dense": {"kernel": grads["dense"]["kernel"], "bias": grads["dense"]["bias"]}}
  p = {"dense": {"kernel": params["dense"]["kernel"], "bias": params["dense"]["bias"]}}
  tx.update(covered, tx.init(p), layer_stats=stats)  # nothing uncovered: no error


# The fallback's state under jit and lax.cond (tree, shapes, dtypes, weak types, one compile)
# is checked with every other option in tests/test_optax_battery.py.


def test_fallback_options_are_validated():
  with pytest.raises(ValueError, match="'adam'"):
    cgfac.scale_by_cgfac(0.1, fallback="adam")
  with pytest.raises(ValueError, match="1.0"):
    cgfac.scale_by_cgfac(0.1, fallback_decay=1.0)


def test_parameters_without_stats_are_announced_once(caplog):
  params = {
    "dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)},
    "announced_norm": {"scale": jnp.ones(4)},
    "announced_embed": {"embedding": jnp.zeros((5, 3))},
  }
  grads = jax.tree.map(jnp.ones_like, params)
  stats = {"dense": cgfac.DenseStats(jnp.ones((4, 3)), jnp.ones((4, 2)))}
  tx = cgfac.scale_by_cgfac(0.05, solver="eigh")
  with caplog.at_level("WARNING", logger="cgfac_optax"):
    for _ in range(2):  # traced twice (eagerly): logged once
      tx.update(grads, tx.init(params), layer_stats=stats)
  messages = [r.getMessage() for r in caplog.records if r.name == "cgfac_optax"]
  assert len(messages) == 1, messages
  assert "2 parameter(s) have no curvature stats and take the 'diagonal' fallback" in messages[0]
  assert "'announced_embed/embedding', 'announced_norm/scale'" in messages[0]
  assert "dense" not in messages[0]


def test_non_finite_gradient_without_stats_is_skipped_alone():
  params, batches = _setup(steps=2)
  tx = cgfac.scale_by_cgfac(0.05, solver="eigh")
  update = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))
  (grads, stats), (grads2, stats2) = batches
  _, state = update(grads, tx.init(params), stats)
  bad = jax.tree.map(lambda x: x, grads2)
  bad["norm"]["scale"] = bad["norm"]["scale"].at[1].set(jnp.nan)
  out, after = update(bad, state, stats2)
  clean, _ = update(grads2, state, stats2)
  assert not np.any(out["norm"]["scale"])  # zero update, moment kept
  np.testing.assert_array_equal(
    after.fallback_moment["norm"]["scale"], state.fallback_moment["norm"]["scale"]
  )
  for path in ("dense/kernel", "norm/bias", "embed/embedding"):  # the rest as usual
    np.testing.assert_array_equal(_leaf(out, path), _leaf(clean, path))
  assert int(after.control.fallback_skipped) == 1 and int(after.control.skipped_steps) == 0
