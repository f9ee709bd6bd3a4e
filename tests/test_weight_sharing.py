"""K-FAC-reduce and K-FAC-expand for a layer applied at several positions (patches, tokens).

Expand takes every ``(example, position)`` as a row: ``A = a^T a / (B T)``, ``G = g^T g / B``
(its exactness where the loss sees each position: ``tests/test_sequence.py``). Reduce takes one
row per example, the inputs averaged and the output gradients summed over the positions:
``A = a_bar^T a_bar / B``, ``G = g_hat^T g_hat / B``. It is exact where the loss sees the
positions through their mean (global average pooling before a classifier) and the examples
share one output-gradient covariance: the oracle here is the exact Fisher of a tiny pooled
model, by enumerating every target.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax as cgfac
from cgfac_optax import _layers

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

B, T, D_IN, K = 4, 3, 2, 3

pytestmark = pytest.mark.usefixtures("x64")  # tests/conftest.py


def _pooled_logits(params, x):
  """One example ``(T, d)``: the layer at every position, then the mean over positions."""
  return jnp.mean(x @ params["kernel"] + params["bias"], axis=0)


def _loss(params, x, y):
  return -jax.nn.log_softmax(_pooled_logits(params, x))[y]


def _combined(grads):
  return jnp.concatenate([grads["kernel"], grads["bias"][None]], 0).ravel()


def _exact_fisher_and_stats(params, x):
  """The exact Fisher of the pooled model, and the stats of every target with its weight."""
  fisher = np.zeros(((D_IN + 1) * K,) * 2)
  cases = []
  # The per-position output gradients of one example's loss: the layer's g at each position.
  per_position = jax.grad(lambda z, y: -jax.nn.log_softmax(jnp.mean(z, 0))[y])
  for j in range(B):
    z = x[j] @ params["kernel"] + params["bias"]
    probs = jax.nn.softmax(_pooled_logits(params, x[j]))
    for y in range(K):
      v = _combined(jax.grad(_loss)(params, x[j], y))
      fisher += float(probs[y]) * np.outer(v, v) / B
      cases.append((j, y, float(probs[y]), per_position(z, y)))
  return fisher, cases


def _block(x, cases, sharing):
  """``A (x) E[G]`` of the library's rows under ``sharing``, ``G`` averaged over the targets."""
  zeros = jnp.zeros((B, T, K))
  rows = _layers.curvature_rows(cgfac.DenseStats(x, zeros), True, None, x.dtype, sharing)
  a = rows.scale_a * rows.a.T @ rows.a
  g = np.zeros((K, K))
  for j, _, weight, g_j in cases:
    stats = cgfac.DenseStats(x[j : j + 1], g_j[None])
    r = _layers.curvature_rows(stats, True, None, x.dtype, sharing)
    g += weight * np.asarray(r.g.T @ r.g) / B
  return oracles.kron_matrix(a, g)


def test_reduce_factors_are_the_means_and_sums_over_positions():
  ka, kg = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (5, 2, 3, 4))  # examples, two position axes, inputs
  g = jax.random.normal(kg, (5, 2, 3, 6))
  rows = _layers.curvature_rows(cgfac.DenseStats(a, g), True, None, a.dtype, "reduce")
  a_np, g_np = np.asarray(a), np.asarray(g)
  a_bar = np.stack([np.append(a_np[n].reshape(-1, 4).mean(0), 1.0) for n in range(5)])
  g_hat = np.stack([g_np[n].reshape(-1, 6).sum(0) for n in range(5)])
  np.testing.assert_allclose(rows.scale_a * rows.a.T @ rows.a, a_bar.T @ a_bar / 5, rtol=1e-12)
  np.testing.assert_allclose(rows.scale_g * rows.g.T @ rows.g, g_hat.T @ g_hat / 5, rtol=1e-12)
  expand = _layers.curvature_rows(cgfac.DenseStats(a, g), True, None, a.dtype, "expand")
  big_a, big_g = oracles.factors(a, g, bias=True)
  np.testing.assert_allclose(expand.scale_a * expand.a.T @ expand.a, big_a, rtol=1e-12)
  np.testing.assert_allclose(expand.scale_g * expand.g.T @ expand.g, big_g, rtol=1e-12)


def test_the_optimizer_keeps_the_reduced_factors():
  params, grads, stats = oracles.dense_layer(0, 4, 3, (6, 5))  # 6 examples, 5 positions
  tx = cgfac.scale_by_cgfac(0.1, solver="pcg", curvature_decay=0.9, weight_sharing="reduce")
  _, state = tx.update(grads, tx.init(params), params, layer_stats=stats)
  a_bar = np.hstack([np.asarray(stats["dense"].inputs).mean(1), np.ones((6, 1))])
  g_hat = np.asarray(stats["dense"].output_grads).sum(1)
  kept = state.curvature["dense"].factors  # the first step's average is its batch factors
  np.testing.assert_allclose(kept.a, a_bar.T @ a_bar / 6, rtol=1e-5)  # float32 stats
  np.testing.assert_allclose(kept.g, g_hat.T @ g_hat / 6, rtol=1e-5)


def test_reduce_equals_the_exact_fisher_of_a_pooled_model():
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  # At zero weights every example's predictive is uniform: one output-gradient covariance.
  params = {"kernel": jnp.zeros((D_IN, K)), "bias": jnp.zeros(K)}
  fisher, cases = _exact_fisher_and_stats(params, x)
  np.testing.assert_allclose(_block(x, cases, "reduce"), fisher, rtol=1e-10, atol=1e-14)
  # Expand takes the positions as rows of their own: not this model's Fisher.
  rel = np.linalg.norm(_block(x, cases, "expand") - fisher) / np.linalg.norm(fisher)
  assert rel > 0.1


def test_reduce_is_exact_for_one_example_and_an_approximation_for_several():
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  params = {"kernel": jax.random.normal(jax.random.key(1), (D_IN, K)), "bias": jnp.zeros(K)}
  fisher, cases = _exact_fisher_and_stats(params, x)
  rel = np.linalg.norm(_block(x, cases, "reduce") - fisher) / np.linalg.norm(fisher)
  assert 1e-3 < rel < 1.0
  one = [c for c in cases if c[0] == 0]
  exact_one = sum(
    c[2] * np.outer(v, v) for c in one for v in [_combined(jax.grad(_loss)(params, x[0], c[1]))]
  )
  x_one = jnp.repeat(x[:1], B, axis=0)  # B copies of one example: the block of that example
  cases_one = [(j, y, w, g) for j in range(B) for (_, y, w, g) in one]
  np.testing.assert_allclose(_block(x_one, cases_one, "reduce"), exact_one, rtol=1e-10)


def test_plan_counts_one_row_per_example_with_reduce():
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"conv": {"kernel": shape(3, 3, 8, 16), "bias": shape(16)}}
  stats = {"conv": cgfac.DenseStats(shape(32, 14, 14, 72), shape(32, 14, 14, 16))}
  assert cgfac.plan(params, stats, weight_sharing="reduce")["conv"].rows == 32
  assert cgfac.plan(params, stats, weight_sharing="expand")["conv"].rows == 32 * 14 * 14


def test_weight_sharing_option_is_checked():
  with pytest.raises(
    ValueError, match=r"weight_sharing must be one of \('reduce', 'expand', 'auto'\)"
  ):
    cgfac.scale_by_cgfac(0.1, weight_sharing="mean")


def _sequence_model(pooled: bool):
  """A dense layer at every token, then a head per token or on the tokens' mean."""

  def apply(params, x):
    h = jnp.tanh(x @ params["mix"]["kernel"] + params["mix"]["bias"])
    if pooled:
      h = jnp.mean(h, axis=1)
    return h @ params["head"]["kernel"]

  keys = jax.random.split(jax.random.key(3), 4)
  params = {
    "mix": {"kernel": jax.random.normal(keys[0], (D_IN, 5)), "bias": jnp.zeros(5)},
    "head": {"kernel": jax.random.normal(keys[1], (5, K))},
  }
  x = jax.random.normal(keys[2], (8, T, D_IN))
  y = jax.random.randint(keys[3], (8,) if pooled else (8, T), 0, K)
  return apply, params, x, y


def _first_update(apply, params, x, y, **options):
  loss, grads, extra = cgfac.value_grad_and_extra(apply, loss="softmax_cross_entropy")(
    params, x, y, jax.random.key(0)
  )
  tx = cgfac.cgfac(**options)
  updates, state = tx.update(grads, tx.init(params), params, **extra)
  return updates, state[0].curvature["mix"].factors  # the chain: scale_by_cgfac first


@pytest.mark.parametrize("pooled, picked", [(False, "expand"), (True, "reduce")])
def test_auto_picks_expand_for_a_loss_per_position_and_reduce_for_a_pooled_one(pooled, picked):
  apply, params, x, y = _sequence_model(pooled)
  auto, auto_factors = _first_update(apply, params, x, y)  # cgfac()'s default: "auto"
  same, same_factors = _first_update(apply, params, x, y, weight_sharing=picked)
  other = "reduce" if picked == "expand" else "expand"
  _, other_factors = _first_update(apply, params, x, y, weight_sharing=other)
  jax.tree.map(np.testing.assert_array_equal, (auto, auto_factors), (same, same_factors))
  assert not np.allclose(auto_factors.a, other_factors.a)
  # The plan reads the same outputs and says which form it counted the rows with.
  extra = cgfac.value_grad_and_extra(apply)(params, x, y, jax.random.key(0))[2]
  stats = jax.eval_shape(extra["layer_stats"])
  plan = cgfac.plan(params, stats, curvature_model=extra["curvature_model"])
  assert plan.weight_sharing == picked
  assert plan["mix"].rows == (8 * T if picked == "expand" else 8)
  assert f"weight_sharing: {picked}" in str(plan)


def test_auto_needs_the_curvature_model():
  with pytest.raises(ValueError, match=r"weight_sharing='auto'.*adaptive_step=True"):
    cgfac.cgfac(0.1, weight_sharing="auto")  # the fixed-rate mode has no curvature model
  with pytest.raises(ValueError, match=r"weight_sharing='auto'.*adaptive_step=True"):
    cgfac.scale_by_cgfac(0.1, weight_sharing="auto")
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"conv": {"kernel": shape(3, 3, 8, 16), "bias": shape(16)}}
  stats = {"conv": cgfac.DenseStats(shape(32, 14, 14, 72), shape(32, 14, 14, 16))}
  # cgfac()'s default: without the model the rows are counted as "expand"'s, the most...
  plan = cgfac.plan(params, stats)
  assert plan["conv"].rows == 32 * 14 * 14 and plan.weight_sharing.startswith("auto (rows")
  # ...unless the solver depends on the rows (batch-only curvature: "auto" picks by cost).
  with pytest.raises(ValueError, match=r"weight_sharing='auto'.*pass curvature_model="):
    cgfac.plan(params, stats, curvature_decay=0.0, refresh_every=1)
  dense = {"dense": cgfac.DenseStats(shape(32, 72), shape(32, 16))}
  plan = cgfac.plan({"dense": params["conv"]}, dense)  # no positions: nothing to choose
  assert plan.weight_sharing is None and "weight_sharing" not in str(plan)
