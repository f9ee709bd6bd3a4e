"""Capture rules: how a layer's call turns into rows of ``a`` and ``g``.

A rule belongs to a module class (Linen or NNX) and says, for one call of that
layer, how to turn the call's input into the layer inputs ``a``
(``(examples, ..., d_in)``, in the order of the rows of the kernel reshaped to
``(d_in, d_out)``) and the gradient with respect to the call's output into the
output gradients ``g`` (``(examples, ..., d_out)``). Both functions get the
module instance, for its static configuration only.

The table :data:`RULES` is keyed by class and looked up along the MRO, so a
subclass of ``nn.Dense`` is captured as a dense layer. Another layer kind plugs
in with :func:`register_rule` from any module file::

  register_rule(MyLayer, CaptureRule(inputs=my_inputs, output_grads=identity))

A rule raises ``ValueError`` for a configuration it cannot express as one
``(d_in, d_out)`` kernel; the capture adds the layer's path to the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgfac_optax.flax._conv import conv_inputs


class CaptureRule(NamedTuple):
  """How to capture the curvature rows of one layer kind.

  Attributes:
    inputs: ``(module, x) -> a``: the call's input ``x`` as layer inputs of
      shape ``(examples, ..., d_in)``, without a bias column.
    output_grads: ``(module, dy) -> g``: the gradient with respect to the
      call's output, shape as the output, as ``(examples, ..., d_out)``.
  """

  inputs: Callable[[Any, jax.Array], jax.Array]
  output_grads: Callable[[Any, jax.Array], jax.Array]


RULES: dict[type, CaptureRule] = {}


def register_rule(module_type: type, rule: CaptureRule) -> None:
  """Captures every layer of ``module_type`` (and its subclasses) with ``rule``.

  Args:
    module_type: a ``flax.linen.Module`` or ``flax.nnx.Module`` subclass whose
      ``__call__(inputs, ...)`` is one linear map with a ``kernel`` parameter.
    rule: the :class:`CaptureRule` for it.
  """
  if not isinstance(module_type, type):
    raise TypeError(f"module_type must be a class, got {module_type!r}")
  if not isinstance(rule, CaptureRule):
    raise TypeError(f"rule must be a CaptureRule, got {type(rule).__name__}")
  RULES[module_type] = rule


def find_rule(module: Any) -> CaptureRule | None:
  """The rule of the nearest registered class in ``type(module)``'s MRO."""
  for cls in type(module).__mro__:
    rule = RULES.get(cls)
    if rule is not None:
      return rule
  return None


def identity(module: Any, x: jax.Array) -> jax.Array:
  """The call's array unchanged (dense layers applied over the last axis)."""
  del module
  return x


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def dense_general_inputs(module: nn.DenseGeneral, x: jax.Array) -> jax.Array:
  """Moves the contracted axes last (in the kernel's sorted order) and flattens them."""
  if _as_tuple(module.batch_dims):
    raise ValueError(
      f"DenseGeneral with batch_dims={module.batch_dims!r} has one kernel per batch "
      "index; only batch_dims=() can be captured"
    )
  axes = sorted(ax % x.ndim for ax in _as_tuple(module.axis))
  if 0 in axes:
    raise ValueError(
      f"DenseGeneral with axis={module.axis!r} contracts the leading (examples) axis of an "
      f"input of shape {x.shape}; the leading axis must be the examples"
    )
  n = len(axes)
  moved = jnp.moveaxis(x, axes, list(range(x.ndim - n, x.ndim)))
  return moved.reshape(moved.shape[: x.ndim - n] + (int(np.prod(moved.shape[x.ndim - n :])),))


def dense_general_output_grads(module: nn.DenseGeneral, dy: jax.Array) -> jax.Array:
  """Flattens the feature axes (last ``len(features)``) into one."""
  n = len(_as_tuple(module.features))
  return dy.reshape(dy.shape[: dy.ndim - n] + (int(np.prod(dy.shape[dy.ndim - n :])),))


DENSE = CaptureRule(inputs=identity, output_grads=identity)

register_rule(nn.Dense, DENSE)
register_rule(nn.DenseGeneral, CaptureRule(dense_general_inputs, dense_general_output_grads))
register_rule(nnx.Linear, DENSE)

# Convolutions are dense layers on patch rows (KFC); the rule lives with the patch code.
CONV = CaptureRule(inputs=conv_inputs, output_grads=identity)

register_rule(nn.Conv, CONV)
register_rule(nnx.Conv, CONV)
