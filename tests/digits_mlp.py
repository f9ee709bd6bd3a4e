"""A tiny pure-JAX MLP on sklearn's digits, with its curvature stats computed by hand.

The stats of each dense layer are its inputs (from the forward pass) and the per-example
gradients of the loss with respect to its pre-activations (from zero perturbations added to
them, differentiated through the SUM of the per-example losses).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import cgfac_optax as cgfac

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402


def digits(n=256, offset=0):
  x, y = load_digits(return_X_y=True)
  x, y = x[offset : offset + n], y[offset : offset + n]
  return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


def init(seed, sizes=(64, 16, 10)):
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return {
    f"layer{i}": {"kernel": jax.random.normal(k, (m, n)) / np.sqrt(m), "bias": jnp.zeros(n)}
    for i, (k, m, n) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def _forward(params, x, eps):
  names = sorted(params)
  h, inputs = x, {}
  for i, name in enumerate(names):
    inputs[name] = h
    z = h @ params[name]["kernel"] + params[name]["bias"] + eps[name]
    h = jnp.tanh(z) if i < len(names) - 1 else z
  return h, inputs


def _zeros(params, x):
  return {k: jnp.zeros((x.shape[0], p["bias"].shape[0])) for k, p in params.items()}


def logits(params, x):
  return _forward(params, x, _zeros(params, x))[0]


def loss(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def loss_grads_stats(params, x, y):
  """Mean loss, its gradient, and ``{layer: DenseStats}`` (empirical Fisher)."""

  def total(params, eps):
    logits, inputs = _forward(params, x, eps)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per_example.sum(), (per_example.mean(), inputs)

  (_, (mean, inputs)), (g_params, g_out) = jax.value_and_grad(total, (0, 1), has_aux=True)(
    params, _zeros(params, x)
  )
  grads = jax.tree.map(lambda t: t / x.shape[0], g_params)
  return mean, grads, {k: cgfac.DenseStats(inputs[k], g_out[k]) for k in inputs}


def fisher_norm(stats, x) -> float:
  """``sum_l <x_l, A_l x_l G_l>`` in float64 from the stats (explicit factors)."""
  total = 0.0
  for name, s in stats.items():
    big_a, big_g = oracles.factors(s.inputs, s.output_grads, bias=True)
    m = oracles.as_matrix(x[name])
    total += np.sum(m * (big_a @ m @ big_g))
  return total
