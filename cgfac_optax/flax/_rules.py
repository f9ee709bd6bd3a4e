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
``(d_in, d_out)`` kernel; the capture adds the layer's path to the message. A
rule with an ``applies`` predicate captures only the instances it accepts
(``nnx.Einsum`` is captured when its equation is a dense map); the others get
no stats, like any layer without a rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgfac_optax._layers import path_str
from cgfac_optax.flax._conv import conv_inputs


class CaptureRule(NamedTuple):
  """How to capture the curvature rows of one layer kind.

  Attributes:
    inputs: ``(module, x) -> a``: the call's input ``x`` as layer inputs of
      shape ``(examples, ..., d_in)``, without a bias column.
    output_grads: ``(module, dy) -> g``: the gradient with respect to the
      call's output, shape as the output, as ``(examples, ..., d_out)``.
    applies: optional ``module -> bool``: whether this instance is captured
      (from its static configuration); ``None`` captures every instance.
  """

  inputs: Callable[[Any, jax.Array], jax.Array]
  output_grads: Callable[[Any, jax.Array], jax.Array]
  applies: Callable[[Any], bool] | None = None


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
  """The rule of the nearest registered class in ``type(module)``'s MRO, if it applies."""
  for cls in type(module).__mro__:
    rule = RULES.get(cls)
    if rule is not None:
      return rule if rule.applies is None or rule.applies(module) else None
  return None


def apply_rule(fn: Callable, module: Any, x: jax.Array, path: tuple) -> jax.Array:
  """Runs a rule function; its errors name the layer."""
  try:
    return fn(module, x)
  except ValueError as e:
    raise ValueError(f"layer {path_str(path)!r} ({type(module).__name__}): {e}") from e


def _class_name(cls: type) -> str:
  for prefix, short in (("flax.linen.", "nn."), ("flax.nnx.", "nnx.")):
    if cls.__module__.startswith(prefix):
      return short + cls.__qualname__
  return f"{cls.__module__}.{cls.__qualname__}"


def no_layers_message() -> str:
  """What a model without a captured layer is told: the classes that are captured."""
  names = sorted(_class_name(cls) for cls in RULES)
  return (
    "the model calls no layer whose curvature can be captured; supported layer classes "
    f"(and subclasses): {names}"
  )


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


def _flatten_last(x: jax.Array, n: int) -> jax.Array:
  return x.reshape(x.shape[: x.ndim - n] + (int(np.prod(x.shape[x.ndim - n :])),))


def linear_general_inputs(module: nnx.LinearGeneral, x: jax.Array) -> jax.Array:
  """``nnx.LinearGeneral``: the contracted axes moved last (sorted, as the layer pairs them)."""
  if module.batch_axis:
    raise ValueError(
      f"LinearGeneral with batch_axis={dict(module.batch_axis)!r} has one kernel per batch "
      "index; only batch_axis={} can be captured"
    )
  axes = sorted(ax % x.ndim for ax in module.axis)
  if 0 in axes:
    raise ValueError(
      f"LinearGeneral with axis={module.axis!r} contracts the leading (examples) axis of an "
      f"input of shape {x.shape}; the leading axis must be the examples"
    )
  n = len(axes)
  return _flatten_last(jnp.moveaxis(x, axes, list(range(x.ndim - n, x.ndim))), n)


def linear_general_output_grads(module: nnx.LinearGeneral, dy: jax.Array) -> jax.Array:
  """Flattens the output feature axes (the last ``len(out_features)``) into one."""
  return _flatten_last(dy, len(module.out_features))


class _DenseEinsum(NamedTuple):
  """An einsum ``x, kernel -> y`` that is one dense map, by axis letter."""

  lhs: str  # the input's letters, "." for each axis of an ellipsis
  out: str  # the output's letters
  contracted: str  # the kernel's input letters, in the kernel's order
  features: str  # the kernel's output letters, in the kernel's (and the output's) order


def _dense_einsum(equation: str | None) -> _DenseEinsum | None:
  """The equation as a dense map, or ``None`` if it is not one we can capture.

  A dense map: the kernel is ``(contracted..., features...)``; the input's other
  axes (the examples first) pass to the output in their order, followed by the
  features in the kernel's order; no axis is summed away or shared with the kernel.
  """
  if not equation or "->" not in equation or equation.count(",") != 1:
    return None
  operands, out = equation.replace(" ", "").split("->")
  lhs, rhs = operands.split(",")
  lhs, out = lhs.replace("...", "."), out.replace("...", ".")
  if "." in rhs or len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
    return None
  contracted = "".join(c for c in rhs if c in lhs and c not in out)
  features = "".join(c for c in rhs if c in out and c not in lhs)
  passed = "".join(c for c in lhs if c not in rhs)
  if (
    not contracted
    or not features
    or rhs != contracted + features
    or out != passed + features
    or not passed
    or lhs[0] in rhs
  ):
    return None
  return _DenseEinsum(lhs, out, contracted, features)


def _einsum_applies(module: nnx.Einsum) -> bool:
  spec = _dense_einsum(getattr(module, "einsum_str", None))
  if spec is None:
    return False
  bias_shape = getattr(module, "bias_shape", None)
  if bias_shape is None:
    return True
  kernel_shape = tuple(module.kernel_shape)
  return math.prod(bias_shape) == math.prod(kernel_shape[len(spec.contracted) :])


def _expand(letters: str, ndim: int) -> list[str]:
  """Letters per axis, the ellipsis ``"."`` standing for ``ndim - (len - 1)`` axes."""
  if "." not in letters:
    return list(letters)
  head, tail = letters.split(".")
  return list(head) + [f".{i}" for i in range(ndim - len(head) - len(tail))] + list(tail)


def einsum_inputs(module: nnx.Einsum, x: jax.Array) -> jax.Array:
  """``nnx.Einsum`` as a dense map: the contracted axes moved last in the kernel's order."""
  spec = _dense_einsum(module.einsum_str)
  letters = _expand(spec.lhs, x.ndim)
  order = [i for i, c in enumerate(letters) if c not in spec.contracted]
  order += [letters.index(c) for c in spec.contracted]
  return _flatten_last(jnp.transpose(x, order), len(spec.contracted))


def einsum_output_grads(module: nnx.Einsum, dy: jax.Array) -> jax.Array:
  """The feature axes (last in the output) flattened into one."""
  return _flatten_last(dy, len(_dense_einsum(module.einsum_str).features))


DENSE = CaptureRule(inputs=identity, output_grads=identity)

register_rule(nn.Dense, DENSE)
register_rule(nn.DenseGeneral, CaptureRule(dense_general_inputs, dense_general_output_grads))
register_rule(nnx.Linear, DENSE)
# nnx.MultiHeadAttention's projections are nnx.LinearGeneral layers.
register_rule(nnx.LinearGeneral, CaptureRule(linear_general_inputs, linear_general_output_grads))
register_rule(nnx.Einsum, CaptureRule(einsum_inputs, einsum_output_grads, _einsum_applies))

# Convolutions are dense layers on patch rows (KFC); the rule lives with the patch code.
CONV = CaptureRule(inputs=conv_inputs, output_grads=identity)

register_rule(nn.Conv, CONV)
register_rule(nnx.Conv, CONV)
