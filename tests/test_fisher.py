"""The sampled Fisher: Monte Carlo against the analytic Fisher of the output distribution.

For targets drawn from the model's predictive distribution, the expected outer product of
the per-example output gradients of a layer is ``J^T F_out J``: the Fisher of the output
distribution (softmax: ``diag(p) - p p^T``; Bernoulli: ``diag(p (1 - p))``; unit Gaussian:
``I``) pulled back through the Jacobian ``J`` of the outputs with respect to the layer's
outputs. The mean over N samples of ``G = g^T g / B`` must match ``(1/B) sum_j J_j^T F_j J_j``
within 5 Monte Carlo standard errors, elementwise (the standard error is estimated from the
same samples); the test also checks that this tolerance is under 10% of the diagonal, so a
wrong scale cannot pass.
"""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cgfac_optax import flax as cflax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

F64 = jnp.float64
SAMPLES = 4000


class MLP(nn.Module):
  out: int

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4, param_dtype=F64, name="hidden")(x))
    return nn.Dense(self.out, param_dtype=F64, name="head")(h)


def output_fisher(kind, out):
  """Per-position Fisher of the output distribution, ``(..., k, k)``."""
  k = out.shape[-1]
  if kind == "softmax_cross_entropy":
    p = jax.nn.softmax(out)
    return jnp.einsum("...i,ij->...ij", p, jnp.eye(k)) - p[..., :, None] * p[..., None, :]
  if kind == "sigmoid_binary_cross_entropy":
    p = jax.nn.sigmoid(out)
    return jnp.einsum("...i,ij->...ij", p * (1 - p), jnp.eye(k))
  return jnp.broadcast_to(jnp.eye(k), out.shape + (k,))


def dummy_targets(kind, out_shape):
  if kind == "softmax_cross_entropy":
    return jnp.zeros(out_shape[:-1], jnp.int32)
  return jnp.zeros(out_shape, F64)


def monte_carlo_g(model, params, x, kind):
  """Samples of ``G = g^T g / B`` for each layer, one per PRNG key."""
  out = model.apply({"params": params}, x)
  t = dummy_targets(kind, out.shape)
  vgs = oracles.with_stats(cflax.value_grad_and_extra(model, loss=kind, fisher="sampled"))

  def one(key):
    _, _, stats = vgs(params, x, t, key)
    return {
      name: jnp.einsum("...i,...j->ij", s.output_grads, s.output_grads) / x.shape[0]
      for name, s in stats.items()
    }

  keys = jax.random.split(jax.random.key(7), SAMPLES)
  return jax.jit(jax.vmap(one))(keys)


def assert_matches(samples, analytic):
  mean = samples.mean(0)
  se = samples.std(0) / np.sqrt(samples.shape[0])
  assert np.all(5 * np.diag(se) < 0.1 * np.abs(np.diag(analytic))), (se, analytic)
  np.testing.assert_array_less(np.abs(mean - analytic), 5 * se + 1e-12)


@pytest.mark.parametrize(
  "kind", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy", "squared_error"]
)
def test_sampled_fisher_matches_output_fisher(x64, kind):
  model, b = MLP(out=3), 3
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  samples = monte_carlo_g(model, params, x, kind)

  out = model.apply({"params": params}, x)
  fisher = output_fisher(kind, out)  # (B, k, k)
  # Last layer: its output is the model's output, J = I.
  assert_matches(samples["head"], fisher.mean(0))

  # Hidden layer: J_j = d out_j / d pre-activation_j, through tanh and the head.
  pre = x @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  head = lambda z: jnp.tanh(z) @ params["head"]["kernel"] + params["head"]["bias"]
  jac = jax.vmap(jax.jacobian(head))(pre)  # (B, k, 4)
  pulled = jnp.einsum("bki,bkl,blj->bij", jac, fisher, jac)
  assert_matches(samples["hidden"], pulled.mean(0))


def test_sampled_fisher_over_positions(x64):
  """Outputs ``(B, T, k)``: the per-example loss averages positions, so its gradient carries
  ``1/T``; the capture's ``g`` is ``sqrt(T)`` times it, so that ``G`` is the mean of the positions'
  output Fisher (the loss's own curvature), not ``1/T`` of it."""
  model, b, t_len = MLP(out=3), 2, 3
  x = jax.random.normal(jax.random.key(0), (b, t_len, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  samples = monte_carlo_g(model, params, x, "softmax_cross_entropy")
  fisher = output_fisher("softmax_cross_entropy", model.apply({"params": params}, x))
  analytic = fisher.sum((0, 1)) / (b * t_len)
  assert_matches(samples["head"], analytic)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_each_pass_runs_the_model_forward_once(x64, fisher):
  """The loss pass and the stats pass each run the model forward once (one tanh each), the stats
  pass on the first ``curvature_batch_size`` examples; the stats are computed only when
  ``layer_stats`` is called."""
  model = MLP(out=3)
  x = jnp.ones((6, 3), F64)
  params = model.init(jax.random.key(1), x)["params"]
  t = jnp.zeros((6,), jnp.int32)
  fn = cflax.value_grad_and_extra(model, fisher=fisher, curvature_batch_size=4)

  def tanh_shapes(f):
    jaxpr = jax.make_jaxpr(f)(params, x, t, jax.random.key(0))
    return [e.outvars[0].aval.shape for e in jaxpr.eqns if e.primitive.name == "tanh"]

  assert tanh_shapes(lambda *a: fn(*a)[:2]) == [(6, 4)]  # loss and grads: the whole batch
  assert tanh_shapes(lambda *a: fn(*a)[2]["layer_stats"]()) == [(6, 4), (4, 4)]


def test_nnx_and_linen_give_the_same_sampled_stats(x64):
  linen = MLP(out=3)
  x = jax.random.normal(jax.random.key(0), (5, 3), F64)
  params = linen.init(jax.random.key(1), x)["params"]

  class Net(nnx.Module):
    def __init__(self):
      rngs = nnx.Rngs(0)
      self.hidden = nnx.Linear(3, 4, param_dtype=F64, rngs=rngs)
      self.head = nnx.Linear(4, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, v):
      return self.head(jnp.tanh(self.hidden(v)))

  net = Net()
  for name in ("hidden", "head"):
    getattr(net, name).kernel[...] = params[name]["kernel"]
    getattr(net, name).bias[...] = params[name]["bias"]
  t = jnp.array([0, 1, 2, 0, 1])
  key = jax.random.key(3)
  loss_l, _, stats_l = oracles.with_stats(cflax.value_grad_and_extra(linen))(params, x, t, key)
  loss_n, _, stats_n = oracles.with_stats(cflax.nnx_value_grad_and_extra)(net, x, t, key)
  np.testing.assert_allclose(loss_l, loss_n, rtol=1e-12)
  for name in ("hidden", "head"):
    np.testing.assert_allclose(stats_l[name].inputs, stats_n[name].inputs, atol=1e-12)
    np.testing.assert_allclose(stats_l[name].output_grads, stats_n[name].output_grads, atol=1e-12)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_compiled_cost_of_the_loss_pass_and_the_stats_pass(fisher):
  """The loss pass costs the FLOPs of ``jax.value_and_grad``; the stats pass, one forward pass of
  the first ``curvature_batch_size`` examples and a backward pass through the activations only
  (no parameter gradients), for either Fisher."""
  model = nn.Sequential([nn.Dense(256), nn.tanh, nn.Dense(256), nn.tanh, nn.Dense(10)])
  b, k = 128, 32
  x, y = jnp.ones((b, 256)), jnp.zeros(b, jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]
  fn = cflax.value_grad_and_extra(model, fisher=fisher, curvature_batch_size=k)

  def flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  def mean_loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  reference = flops(jax.value_and_grad(mean_loss), params)
  key = jax.random.key(1)
  loss_pass = flops(lambda *a: fn(*a)[:2], params, x, y, key)
  both = flops(oracles.with_stats(fn), params, x, y, key)
  # The matrix products: forward 2 k d_in d_out per layer; backward through the activations of
  # the two upper layers (their inputs' gradients), 2 k 256 (256 + 10).
  forward = 2 * k * 256 * (256 + 256 + 10)
  activations_backward = 2 * k * 256 * (256 + 10)
  assert abs(loss_pass - reference) < 0.01 * reference
  # A parameter gradient would add 2 k 256 (256 + 256 + 10) more: the tolerance excludes it.
  stats_pass = both - loss_pass
  assert abs(stats_pass - forward - activations_backward) < 0.1 * activations_backward, (
    stats_pass,
    forward,
    activations_backward,
  )
