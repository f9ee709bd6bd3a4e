"""Dense layers over sequences (B, T, d): rows are tokens, and the K-FAC "expand" scale.

With ``rows = B T`` token rows, ``A = a^T a / (B T)`` and ``G = g^T g / B``, where ``g`` is the
gradient of the per-example loss (all of an example's tokens) with respect to each token's
output. This is kfac-jax's ``RepeatedDenseKroneckerFactored`` (both factors summed over tokens
and divided by ``B``, the block scaled by ``1 / T``), and the K-FAC-expand of Eschenhagen et al.
(2023). The oracle here is the exact Fisher of a tiny model: where K-FAC-expand is exact (tokens
share one output-gradient covariance), the block equals it. For a per-example loss that sums its
tokens that holds with ``g`` the loss's gradient; for one that averages them (the library's
losses) the capture multiplies ``g`` by ``sqrt(T)``, and the block equals the curvature of that
loss (its Gauss-Newton matrix ``J^T H J``), the matrix the quadratic model and the damping use.
"""

import itertools
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


def _model(params, x):
  return x @ params["kernel"] + params["bias"]  # (T, K) logits for one example


def _example_loss(params, x, y, reduce):
  logp = jax.nn.log_softmax(_model(params, x))
  token_losses = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
  return reduce(token_losses)


def _combined(grads):
  """``[kernel; bias]`` as one ``(d_in + 1) x K`` matrix, flattened row-major."""
  return jnp.concatenate([grads["kernel"], grads["bias"][None]], 0).ravel()


def _exact_fisher_and_expected_stats(params, x, reduce):
  """The true Fisher of the per-example loss and ``E[G]``, over every target sequence."""
  fisher = np.zeros(((D_IN + 1) * K,) * 2)
  g_cov = np.zeros((K, K))
  grad_params = jax.grad(_example_loss)
  grad_outputs = jax.grad(
    lambda logits, y: reduce(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0])
  )
  for j in range(B):
    probs = jax.nn.softmax(_model(params, x[j]))
    for ys in itertools.product(range(K), repeat=T):
      y = jnp.array(ys)
      weight = float(jnp.prod(probs[jnp.arange(T), y]))
      v = _combined(grad_params(params, x[j], y, reduce))
      fisher += weight * np.outer(v, v) / B
      g = grad_outputs(_model(params, x[j]), y)  # (T, K): per-token output gradients
      g_cov += weight * np.asarray(g.T @ g) / B
  return fisher, g_cov


def _a_factor(x):
  """The library's ``A`` of (B, T, d) inputs with a bias: its rows, scaled by its ``s_A``."""
  rows = _layers.curvature_rows(cgfac.DenseStats(x, jnp.zeros((B, T, K))), True, None, x.dtype)
  assert rows.scale_a == 1 / (B * T)
  assert _layers.factor_scales(cgfac.DenseStats(x, jnp.zeros((B, T, K))))[0] == rows.scale_a
  return rows.scale_a * rows.a.T @ rows.a


def test_expand_normalisation_equals_the_exact_fisher_of_a_summed_loss():
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  # At zero weights every token's predictive is uniform: the output-gradient covariance is
  # the same for all tokens, the case in which K-FAC-expand is exact.
  params = {"kernel": jnp.zeros((D_IN, K)), "bias": jnp.zeros(K)}
  fisher, g_factor = _exact_fisher_and_expected_stats(params, x, jnp.sum)
  block = oracles.kron_matrix(_a_factor(x), g_factor)
  # T = 3 tokens: dividing G by rows (B T) instead of examples would miss by 3x.
  np.testing.assert_allclose(block, fisher, rtol=1e-10, atol=1e-14)


def test_captured_expand_block_equals_the_curvature_of_the_token_averaged_loss():
  """The capture's ``G`` (expected over targets) with ``A``: ``J^T H J`` of the batch loss."""
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  params = {"dense": {"kernel": jnp.zeros((D_IN, K)), "bias": jnp.zeros(K)}}
  apply_fn = lambda p, v: _model(p["dense"], v)
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="empirical")
  # Uniform predictive at zero weights, and G adds up over tokens: its expectation over targets
  # drawn from the model is the mean of G over the K constant target sequences.
  big_g = 0
  for label in range(K):
    stats = fn(params, x, jnp.full((B, T), label))[2]["layer_stats"]()["dense"]
    big_g += oracles.factors(stats.inputs, stats.output_grads, bias=True)[1] / K
  big_a = oracles.factors(stats.inputs, stats.output_grads, bias=True)[0]

  def batch_loss(logits):
    # Softmax cross-entropy averaged over tokens and examples; its Hessian in the logits does not
    # depend on the targets.
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.zeros((B, T, 1), int), -1))

  combined = lambda w: apply_fn({"dense": {"kernel": w[:D_IN], "bias": w[D_IN]}}, x)
  w = jnp.concatenate([params["dense"]["kernel"], params["dense"]["bias"][None]])
  jac = jax.jacobian(combined)(w).reshape(B * T * K, -1)
  hessian = jax.hessian(batch_loss)(combined(w)).reshape(B * T * K, B * T * K)
  curvature = jac.T @ hessian @ jac
  # Without the capture's sqrt(T) the block would be 1/T of the curvature (T = 3 here).
  np.testing.assert_allclose(oracles.kron_matrix(big_a, big_g), curvature, rtol=1e-10, atol=1e-14)


def test_expand_is_an_approximation_away_from_that_case():
  x = jax.random.normal(jax.random.key(0), (B, T, D_IN))
  params = {"kernel": jax.random.normal(jax.random.key(1), (D_IN, K)), "bias": jnp.zeros(K)}
  fisher, g_factor = _exact_fisher_and_expected_stats(params, x, jnp.sum)
  block = oracles.kron_matrix(_a_factor(x), g_factor)
  rel = np.linalg.norm(block - fisher) / np.linalg.norm(fisher)
  assert 1e-3 < rel < 1.0


def test_token_stats_reproduce_per_example_gradients_summed_over_tokens():
  kx, kw, ky = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (B, T, D_IN))
  params = {"kernel": jax.random.normal(kw, (D_IN, K)), "bias": jnp.zeros(K)}
  y = jax.random.randint(ky, (B, T), 0, K)
  per_example = jax.vmap(jax.grad(_example_loss), in_axes=(None, 0, 0, None))(params, x, y, jnp.sum)

  def loss_of_logits(logits, y):
    return jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  g = jax.vmap(jax.grad(loss_of_logits))(jax.vmap(_model, (None, 0))(params, x), y)
  stats = cgfac.DenseStats(inputs=x, output_grads=g)
  np.testing.assert_allclose(
    jnp.einsum("btd,btk->bdk", stats.inputs, stats.output_grads), per_example["kernel"], rtol=1e-12
  )
  np.testing.assert_allclose(stats.output_grads.sum(1), per_example["bias"], rtol=1e-12)
