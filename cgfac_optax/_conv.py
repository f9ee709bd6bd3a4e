"""Convolutions as dense layers on patch rows (KFC, Grosse & Martens 2016).

A convolution ``y = conv(x, W)`` is a dense layer applied at every output
position: with ``p_{j,l}`` the receptive-field patch of example ``j`` at output
position ``l``, flattened in the kernel's own order (``(kh, kw, c_in)`` for
Flax's ``HWIO`` kernels), ``y_{j,l} = p_{j,l} @ W.reshape(-1, c_out)``. So a
conv layer's curvature stats are :class:`~cgfac_optax.DenseStats` with
``inputs`` the patches, shape ``(examples, *out_spatial, kh kw c_in)``, and
``output_grads`` the per-example output gradients, shape
``(examples, *out_spatial, c_out)``, and every solver of the dense block
applies unchanged.

Normalisation (KFC): rows are the ``examples x positions`` output positions and

.. math::

  A = \\frac{1}{B L} \\sum_{j,l} p_{j,l} p_{j,l}^\\top, \\qquad
  G = \\frac{1}{B} \\sum_{j,l} g_{j,l} g_{j,l}^\\top,

for ``B`` examples and ``L`` output positions each: the library's
``A = a^T a / rows``, ``G = g^T g / examples`` rule. ``A (x) G`` equals the
KFC approximation ``L E[p p^T] (x) E[g g^T]`` with expectations over examples
and positions, which is also the scale kfac-jax's ``Conv2DTwoKroneckerFactored``
uses (both factors over ``B L``, times ``L``). With one position per example
(a 1x1 conv on a 1x1 image) it is exactly the dense layer's block, and a 1x1
stride-1 conv is a dense layer applied at every pixel. That is the optimizer's
``weight_sharing="expand"``; with ``"reduce"`` each example's patches are
averaged and its output gradients summed over the positions first
(K-FAC-reduce, see :func:`cgfac_optax.scale_by_cgfac`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cgfac_optax._layers import DenseStats

Padding = str | Sequence[tuple[int, int]]


def _dimension_numbers(lhs_ndim: int, dimension_numbers) -> Any:
  if dimension_numbers is not None:
    return dimension_numbers
  spatial = "".join(chr(ord("A") + i) for i in range(lhs_ndim - 2))
  return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def _check_kernel(inputs: jax.Array, kernel_shape, feature_group_count: int) -> tuple[int, ...]:
  """The kernel shape as ints, after the checks of :func:`conv_patches` that need no layout."""
  if feature_group_count != 1:
    raise ValueError(
      "grouped convolutions have no single Kronecker-factored block: "
      f"feature_group_count must be 1, got {feature_group_count!r}"
    )
  kernel_shape = tuple(int(k) for k in kernel_shape)
  n = inputs.ndim - 2
  if len(kernel_shape) != n + 2:
    raise ValueError(
      f"kernel_shape {kernel_shape} must have rank {n + 2} for inputs {inputs.shape}"
    )
  return kernel_shape


def conv_patches(
  inputs: jax.Array,
  kernel_shape: Sequence[int],
  *,
  window_strides: Sequence[int] | None = None,
  padding: Padding = "VALID",
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
) -> jax.Array:
  """The patch rows of a convolution, features in the kernel's order.

  Takes the arguments of ``lax.conv_general_dilated`` (with the kernel's shape
  in place of the kernel) and returns ``p`` such that
  ``conv(inputs, kernel)`` with the channels moved last equals
  ``p @ kernel.reshape(-1, c_out)``.

  Args:
    inputs: the layer input, ``rank n + 2``.
    kernel_shape: the kernel's shape; its output-feature dimension must be last
      (as in Flax's ``HWIO``), so that ``kernel.reshape(-1, c_out)`` is the
      dense weight matrix.
    window_strides: ``n`` strides (default all 1).
    padding: ``"SAME"``, ``"VALID"`` or ``n`` ``(low, high)`` pairs.
    lhs_dilation: input dilation (transposed convolution), ``n`` ints or None.
    rhs_dilation: kernel dilation (atrous convolution), ``n`` ints or None.
    dimension_numbers: as in ``lax.conv_general_dilated``; ``None`` means
      channels-last, Flax's layout (``("NHWC", "HWIO", "NHWC")`` in 2D), not
      lax's ``NCHW`` default.
    feature_group_count: must be 1: a grouped (e.g. depthwise) convolution is
      block-diagonal over groups with a different input factor per group, not
      one Kronecker product.

  Returns:
    Patches of shape ``(batch, *out_spatial, prod(kernel_shape[:-1]))``: the
    conv output's batch and spatial dimensions in the output layout's order,
    features flattened in the order of the kernel's non-output dimensions.

  Raises:
    ValueError: for ``feature_group_count != 1``, a kernel whose output
      dimension is not last, or inputs whose channels do not match the kernel.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from cgfac_optax import conv_patches
    >>> x = jnp.ones((2, 5, 5, 3))
    >>> conv_patches(x, (3, 3, 3, 4), window_strides=(2, 2), padding="SAME").shape
    (2, 3, 3, 27)
  """
  kernel_shape = _check_kernel(inputs, kernel_shape, feature_group_count)
  specs = _dimension_numbers(inputs.ndim, dimension_numbers)
  dn = lax.conv_dimension_numbers(inputs.shape, kernel_shape, specs)
  out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
  if out_dim != len(kernel_shape) - 1:
    raise ValueError(
      "the kernel's output-feature dimension must be last (e.g. 'HWIO'), so that "
      f"kernel.reshape(-1, c_out) is the dense matrix; got kernel_shape {kernel_shape} "
      f"with dimension_numbers {dimension_numbers!r}"
    )
  c_in = inputs.shape[dn.lhs_spec[1]]
  if kernel_shape[in_dim] != c_in:
    raise ValueError(
      f"inputs have {c_in} channels but kernel_shape {kernel_shape} expects {kernel_shape[in_dim]}"
    )
  n_sp = len(kernel_shape) - 2
  # Logical spatial dim k lives at lhs_spec[2 + k] (input), rhs_spec[2 + k] (kernel) and
  # out_spec[2 + k] (output); strides, padding and dilations are given in that logical order.
  window = [kernel_shape[dn.rhs_spec[2 + k]] for k in range(n_sp)]
  strides = tuple(window_strides) if window_strides is not None else (1,) * n_sp
  lhs_dil = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * n_sp
  rhs_dil = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * n_sp
  extent = [(w - 1) * d + 1 for w, d in zip(window, rhs_dil)]
  x = jnp.transpose(inputs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:-1], extent, strides, padding)
  # Input dilation is interior padding; padding may be negative (a crop), as in lax.
  config = [(0, 0, 0), *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dil)), (0, 0, 0)]
  x = lax.pad(x, jnp.zeros((), x.dtype), config)
  out = [(size - e) // st + 1 for size, e, st in zip(x.shape[1:-1], extent, strides)]
  if min(out) < 1:
    raise ValueError(
      f"the window {tuple(window)} (dilation {rhs_dil}) does not fit the padded input "
      f"{x.shape[1:-1]}: no output positions"
    )
  # One strided slice per window offset: a gather-free im2col, (B, *out, prod(window), C).
  # (lax.conv_general_dilated_patches is an identity-kernel convolution whose backward pass
  # is an order of magnitude slower than these slices' on CPU.)
  slices = []
  for offset in itertools.product(*(range(w) for w in window)):
    begin = [0, *(o * d for o, d in zip(offset, rhs_dil)), 0]
    limit = [x.shape[0], *(b + (o - 1) * st + 1 for b, o, st in zip(begin[1:], out, strides))]
    slices.append(lax.slice(x, begin, [*limit, x.shape[-1]], (1, *strides, 1)))
  patches = jnp.stack(slices, axis=-2).reshape(x.shape[0], *out, *window, x.shape[-1])
  # Features in the kernel's order of its non-output dims; output spatial dims in the output
  # layout's order.
  feature_axis = {dn.rhs_spec[1]: 1 + 2 * n_sp} | {
    dn.rhs_spec[2 + k]: 1 + n_sp + k for k in range(n_sp)
  }
  spatial_order = sorted(range(n_sp), key=lambda k: dn.out_spec[2 + k])
  perm = (0, *(1 + k for k in spatial_order), *(feature_axis[d] for d in range(n_sp + 1)))
  patches = jnp.transpose(patches, perm)
  return patches.reshape(*patches.shape[: 1 + n_sp], -1)


def conv_output_rows(y: jax.Array, dimension_numbers: Any = None) -> jax.Array:
  """A conv output (or its gradient) with batch first and channels last.

  The leading dimensions then line up with :func:`conv_patches`' rows. For the
  default channels-last layout this is the identity.
  """
  specs = _dimension_numbers(y.ndim, dimension_numbers)
  if isinstance(specs, lax.ConvDimensionNumbers):
    out_spec = specs.out_spec
  else:
    out_spec = lax.conv_dimension_numbers(y.shape, y.shape, specs).out_spec
  return jnp.moveaxis(y, (out_spec[0], out_spec[1]), (0, -1))


def conv_stats(
  inputs: jax.Array,
  output_grads: jax.Array,
  kernel_shape: Sequence[int],
  **conv_kwargs,
) -> DenseStats:
  """Curvature stats of a convolution: patch rows and per-position output gradients.

  Args:
    inputs: the conv layer's input.
    output_grads: the gradient of the *per-example* loss with respect to the
      conv output, in the conv output's layout.
    kernel_shape: the kernel's shape (output dimension last).
    **conv_kwargs: the layer's ``window_strides``, ``padding``,
      ``lhs_dilation``, ``rhs_dilation``, ``dimension_numbers`` and
      ``feature_group_count``, as for :func:`conv_patches`.

  Returns:
    ``DenseStats(inputs=patches, output_grads=g)`` with matching leading
    dimensions ``(examples, *out_spatial)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from cgfac_optax import conv_stats
    >>> x, g = jnp.ones((2, 6, 6, 3)), jnp.ones((2, 3, 3, 8))
    >>> s = conv_stats(x, g, (3, 3, 3, 8), window_strides=(2, 2), padding="SAME")
    >>> s.inputs.shape, s.output_grads.shape
    ((2, 3, 3, 27), (2, 3, 3, 8))
  """
  a = conv_patches(inputs, kernel_shape, **conv_kwargs)
  g = conv_output_rows(output_grads, conv_kwargs.get("dimension_numbers"))
  if a.shape[:-1] != g.shape[:-1]:
    raise ValueError(
      f"output_grads {output_grads.shape} do not match the conv output positions "
      f"{a.shape[:-1]} of inputs {inputs.shape} with kernel_shape {tuple(kernel_shape)}"
    )
  return DenseStats(inputs=a, output_grads=g)
