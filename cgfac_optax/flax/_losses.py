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
"""

from __future__ import annotations

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


def _position_mean(x: jax.Array) -> jax.Array:
  """``(examples, ...)`` -> ``(examples,)``: the mean over positions."""
  return x.reshape(x.shape[0], -1).mean(axis=1)


def _cross_entropy(outputs, targets):
  return _position_mean(optax.softmax_cross_entropy_with_integer_labels(outputs, targets))


def _binary_cross_entropy(outputs, targets):
  return _position_mean(optax.sigmoid_binary_cross_entropy(outputs, targets).sum(-1))


def _squared_error(outputs, targets):
  return _position_mean(0.5 * jnp.sum(jnp.square(outputs - targets), axis=-1))


LOSSES: dict[str, LossKind] = {
  "softmax_cross_entropy": LossKind(
    _cross_entropy,
    lambda key, y: jax.random.categorical(key, y, axis=-1),
    lambda shape: shape[:-1],
    True,
  ),
  "sigmoid_binary_cross_entropy": LossKind(
    _binary_cross_entropy,
    lambda key, y: jax.random.bernoulli(key, jax.nn.sigmoid(y)).astype(y.dtype),
    lambda shape: shape,
    False,
  ),
  "squared_error": LossKind(
    _squared_error,
    lambda key, y: y + jax.random.normal(key, y.shape, y.dtype),
    lambda shape: shape,
    False,
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
