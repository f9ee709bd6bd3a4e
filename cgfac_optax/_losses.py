"""Loss kinds: per-example negative log-likelihoods and their predictive samplers.

Each loss is the negative log-likelihood of a distribution over the model's
outputs ``(examples, ..., k)``; the last axis holds one prediction (logits or
means), any axes between the first and the last are positions. The
*per-example* loss sums over the last axis and averages over positions:

- ``"softmax_cross_entropy"``: integer labels ``(examples, ...)``; categorical
  over the last axis. Output Fisher ``diag(p) - p p^T`` per position.
- ``"sigmoid_binary_cross_entropy"``: targets in ``[0, 1]`` shaped like the
  outputs; independent Bernoulli per output. Output Fisher ``diag(p (1 - p))``.
- ``"squared_error"``: ``0.5 * sum_k (y_k - t_k)^2``, the Gaussian with unit
  variance; output Fisher the identity. (This is ``k`` times
  ``optax.l2_loss(y, t).mean(-1)``.)

``sample(key, outputs)`` draws targets from the model's predictive
distribution, for the true (sampled) Fisher.

``output_hvp(outputs, tangent)`` multiplies a tangent shaped like the outputs
by the Hessian of the *batch* loss (the mean of the per-example losses over
the ``examples`` axis) with respect to the outputs. For these three losses
that Hessian is the output Fisher above, scaled by
``1 / (examples * positions)``, block-diagonal over examples and positions and
free of the targets, so no targets are needed (and the Gauss-Newton matrix
built from it is the exact Fisher).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LossKind(NamedTuple):
  per_example: Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, targets) -> (examples,)
  sample: Callable[[jax.Array, jax.Array], jax.Array]  # (key, outputs) -> targets
  targets_shape: Callable[[tuple], tuple]  # outputs shape -> expected targets shape
  integer_targets: bool
  output_hvp: Callable[[jax.Array, jax.Array], jax.Array]  # (outputs, tangent) -> like outputs


def positions(shape: tuple) -> int:
  """How many positions each example of outputs shaped ``(examples, ..., k)`` has (1 for none)."""
  return math.prod(shape[1:-1])


def _position_mean(x: jax.Array) -> jax.Array:
  """``(examples, ...)`` -> ``(examples,)``: the mean over positions."""
  return x.reshape(x.shape[0], -1).mean(axis=1)


def _cross_entropy(outputs, targets):
  return _position_mean(optax.softmax_cross_entropy_with_integer_labels(outputs, targets))


def _binary_cross_entropy(outputs, targets):
  return _position_mean(optax.sigmoid_binary_cross_entropy(outputs, targets).sum(-1))


def _squared_error(outputs, targets):
  return _position_mean(0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1))


def _hvp_dtype(outputs, tangent):
  # Probabilities near 0 or 1 lose all their digits in float16/bfloat16.
  return jnp.promote_types(jnp.result_type(outputs, tangent), jnp.float32)


def _batch_scale(outputs: jax.Array) -> float:
  """``1 / (examples * positions)``: the weight of one position in the batch loss."""
  return 1.0 / (outputs.shape[0] * positions(outputs.shape))


def _cross_entropy_hvp(outputs, tangent):
  dtype = _hvp_dtype(outputs, tangent)
  p = jax.nn.softmax(outputs.astype(dtype), axis=-1)
  v = tangent.astype(dtype)
  # (diag(p) - p p^T) v without forming the k x k matrix.
  hv = p * (v - jnp.sum(p * v, axis=-1, keepdims=True))
  return hv * _batch_scale(outputs)


def _binary_cross_entropy_hvp(outputs, tangent):
  dtype = _hvp_dtype(outputs, tangent)
  p = jax.nn.sigmoid(outputs.astype(dtype))
  return p * (1 - p) * tangent.astype(dtype) * _batch_scale(outputs)


def _squared_error_hvp(outputs, tangent):
  return tangent.astype(_hvp_dtype(outputs, tangent)) * _batch_scale(outputs)


LOSSES: dict[str, LossKind] = {
  "softmax_cross_entropy": LossKind(
    _cross_entropy,
    lambda key, y: jax.random.categorical(key, y, axis=-1),
    lambda shape: shape[:-1],
    True,
    _cross_entropy_hvp,
  ),
  "sigmoid_binary_cross_entropy": LossKind(
    _binary_cross_entropy,
    lambda key, y: jax.random.bernoulli(key, jax.nn.sigmoid(y)).astype(y.dtype),
    lambda shape: shape,
    False,
    _binary_cross_entropy_hvp,
  ),
  "squared_error": LossKind(
    _squared_error,
    lambda key, y: y + jax.random.normal(key, y.shape, y.dtype),
    lambda shape: shape,
    False,
    _squared_error_hvp,
  ),
}

FISHERS = ("empirical", "sampled")


def get_loss(loss: str) -> LossKind:
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
  return LOSSES[loss]


def check_fisher(fisher: str) -> None:
  if fisher not in FISHERS:
    raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")


def check_targets(kind: LossKind, name: str, outputs, targets) -> None:
  """Validates static shapes and dtypes of the model's outputs and the targets."""
  if outputs.ndim < 2:
    raise ValueError(
      f"the model's outputs must be (examples, ..., k) with a last prediction axis, "
      f"got shape {outputs.shape}"
    )
  expected = kind.targets_shape(tuple(outputs.shape))
  if tuple(targets.shape) != expected:
    raise ValueError(
      f"loss {name!r} needs targets of shape {expected} for outputs of shape "
      f"{tuple(outputs.shape)}, got {tuple(targets.shape)}"
    )
  if kind.integer_targets and not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"loss {name!r} needs integer class labels, got dtype {targets.dtype}")
