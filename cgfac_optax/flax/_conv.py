"""The capture rule of Flax convolutions (``nn.Conv``, ``nnx.Conv``): patch rows.

The rule reproduces the preprocessing of the Flax layer's own ``__call__``
(the same attributes exist in Linen and NNX): extra batch dimensions flattened
into one, ``CIRCULAR``/``REFLECT``/``CAUSAL`` padding applied to the input,
strides and dilations broadcast to every spatial dimension, and then takes
:func:`cgfac_optax.conv_patches` of the input with those options, so that
``patches @ kernel.reshape(-1, features)`` is the layer's output before the
bias. The output gradients need no change: Flax convolutions are channels-last.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from cgfac_optax._conv import conv_patches


def _broadcast(x, n: int) -> tuple[int, ...]:
  if x is None:
    x = 1
  return (x,) * n if isinstance(x, int) else tuple(x)


def conv_inputs(module: Any, x: jax.Array) -> jax.Array:
  """Patch rows ``(*batch, *out_spatial, prod(kernel_size) * c_in)`` of a Flax conv call.

  Raises:
    ValueError: for ``feature_group_count > 1`` (no single Kronecker block) or
      an input without a batch dimension.
  """
  kernel_size = _broadcast(module.kernel_size, 1)
  n = len(kernel_size)
  batch_dims = x.ndim - (n + 1)
  if batch_dims < 1:
    raise ValueError(
      f"a convolution call on an input of shape {x.shape} has no batch (examples) "
      "dimension; call the layer on batched inputs"
    )
  batch_shape = x.shape[:batch_dims]
  x = x.reshape((-1, *x.shape[batch_dims:]))
  strides = _broadcast(module.strides, n)
  input_dilation = _broadcast(module.input_dilation, n)
  kernel_dilation = _broadcast(module.kernel_dilation, n)
  padding = canonicalize_padding(module.padding, n)
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if n != 1:
      raise ValueError(f"CAUSAL padding is only defined for 1D convolutions, got {n}D")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = "VALID"
  c_in = x.shape[-1]
  patches = conv_patches(
    x,
    (*kernel_size, c_in, 1),
    window_strides=strides,
    padding=padding,
    lhs_dilation=input_dilation,
    rhs_dilation=kernel_dilation,
    feature_group_count=module.feature_group_count,
  )
  return patches.reshape((*batch_shape, *patches.shape[1:]))
