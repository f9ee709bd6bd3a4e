r"""A layer: its curvature stats, its parameters as one matrix, and its name.

A *layer* is a parameter dict holding a ``kernel`` (and maybe a ``bias``) for
which ``layer_stats`` has a :class:`DenseStats` at the same path. Everything
about it that the solvers, the planner and the Flax capture share lives here:

- **Names.** A layer is named by the ``/``-joined path of its parameter dict
  (``"Dense_0"``, ``"encoder/Conv_1"``); NNX's trailing ``.value`` is dropped.
- **The matrix layout.** The kernel, reshaped to ``d_in x d_out`` (a conv's
  ``(kh, kw, c_in, c_out)`` kernel becomes ``kh kw c_in x c_out``), with the
  bias appended as the last row, is the ``d_A x d_G`` matrix the Kronecker
  block acts on (``d_A = d_in + 1`` with a bias). Gradients, warm starts and
  updates all travel in this layout.
- **Curvature rows.** The stats ``inputs`` ``(examples, ..., d_in)`` and
  ``output_grads`` ``(examples, ..., d_out)`` are flattened to ``rows x d``
  matrices ``a`` and ``g`` (a column of ones appended to ``a`` for a bias), and
  the factors are ``A = s_A a^T a`` and ``G = s_G g^T g`` with one rule for
  every kind of layer: ``s_A = 1 / rows`` and ``s_G = 1 / examples``. For an
  MLP both are ``1 / B``; for a layer applied at ``T`` positions (tokens,
  a convolution's output pixels) this is the K-FAC "expand" / KFC convention
  (Eschenhagen et al. 2023; Grosse & Martens 2016). With
  ``weight_sharing="reduce"`` the positions are first reduced to one row per
  example, its inputs averaged and its output gradients summed
  (:func:`curvature_rows`), so that ``rows = examples``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class DenseStats(NamedTuple):
  """The curvature statistics of one layer for one batch.

  Attributes:
    inputs: the layer inputs ``a``, shape ``(examples, ..., d_in)``, without the
      homogeneous coordinate (a column of ones is appended when the layer has a
      bias).
    output_grads: the gradients of the *per-example* loss with respect to the
      layer outputs ``g``, shape ``(examples, ..., d_out)``. If the training
      loss is a batch mean, these are ``examples`` times the gradient a
      backward pass of the mean loss gives. If an example's loss is the mean
      of the losses at ``P`` positions of its outputs (a language model's
      tokens), multiply them by ``sqrt(P)`` as well (the helpers do): ``G``
      is then the mean of the positions' output Fisher, the curvature of the
      loss itself, instead of ``1/P`` of it.
  """

  inputs: jax.Array
  output_grads: jax.Array


# Names.


def key_name(key: Any) -> str:
  """The plain name of one path entry (dict key, attribute or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path) -> str:
  """``'Dense_0/kernel'`` for a key path or a tuple of names; NNX's trailing ``.value`` dropped."""
  names = [key_name(k) for k in path]
  if names and names[-1] == "value" and type(path[-1]).__name__ == "GetAttrKey":
    names = names[:-1]
  return "/".join(names)


def leaf_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """``(paths, leaves, treedef)`` of a pytree, paths as :func:`path_str` writes them."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_str(p) for p, _ in flat], [leaf for _, leaf in flat], treedef


def flatten_stats(layer_stats: Any) -> dict[str, DenseStats]:
  """``{layer path: stats}`` for every :class:`DenseStats` in ``layer_stats``."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    layer_stats, is_leaf=lambda x: isinstance(x, DenseStats)
  )
  out = {}
  for path, leaf in flat:
    if leaf is None:
      continue
    if not isinstance(leaf, DenseStats):
      raise TypeError(
        "layer_stats must hold cgfac_optax.DenseStats at each layer's path, "
        f"got {type(leaf).__name__} at {path_str(path)!r}"
      )
    out[path_str(path)] = leaf
  return out


def layers_of(paths: list[str]) -> list[str]:
  """Of leaf paths, the paths of the parameter dicts that hold a ``kernel``: the layers."""
  return [p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == "kernel"]


def layer_paths(params: Any) -> list[str]:
  """Paths of the parameter dicts of ``params`` that hold a ``kernel``: the layers."""
  return layers_of(leaf_paths(params)[0])


def child(path: str, name: str) -> str:
  return f"{path}/{name}" if path else name


# Matching stats to parameters.


class Layer(NamedTuple):
  """One layer with stats, located in the flat leaves of the gradients."""

  path: str
  kernel: int  # index of the kernel leaf
  bias: int | None  # index of the bias leaf, if any
  stats: DenseStats


class LayerShape(NamedTuple):
  """What the cost of a layer's solve depends on."""

  rows: int  # curvature rows: examples (after subsampling) times positions
  d_a: int  # input width, plus one for a bias
  d_g: int  # output width


def match(paths: list[str], leaves: list[Any], layer_stats: Any) -> list[Layer]:
  """Finds each stats entry's kernel and bias among the leaves, checking the shapes.

  Raises:
    ValueError: naming the layer, when its kernel is missing or its shapes do not
      fit the stats.
  """
  index = {p: i for i, p in enumerate(paths)}
  layers = []
  for path, stats in flatten_stats(layer_stats).items():
    k = index.get(child(path, "kernel"))
    if k is None:
      raise ValueError(
        f"layer_stats has stats at {path!r} but the gradients have no "
        f"{child(path, 'kernel')!r}; stats must sit at the path of the layer's parameter dict"
      )
    b = index.get(child(path, "bias"))
    kernel = leaves[k]
    a, g = stats.inputs, stats.output_grads
    if a.ndim < 2 or g.ndim < 2 or a.shape[:-1] != g.shape[:-1]:
      raise ValueError(
        f"layer {path!r}: inputs {a.shape} and output_grads {g.shape} must be "
        "(examples, ..., d) with the same leading dimensions"
      )
    d_in, d_out = a.shape[-1], g.shape[-1]
    if output_axes(kernel.shape, d_in, d_out) is None:
      raise ValueError(
        f"layer {path!r}: kernel shape {kernel.shape} does not match stats with "
        f"inputs (..., {d_in}) and output_grads (..., {d_out}): the kernel's leading axes "
        f"must hold {d_in} entries and its trailing axes {d_out}"
      )
    if b is not None and leaves[b].size != d_out:
      raise ValueError(
        f"layer {path!r}: bias shape {leaves[b].shape} does not match output_grads (..., {d_out})"
      )
    layers.append(Layer(path, k, b, stats))
  return layers


def output_axes(kernel_shape: tuple[int, ...], d_in: int, d_out: int) -> int | None:
  """How many trailing axes of the kernel are its outputs, or ``None`` if no split fits.

  A kernel is ``(*in_axes, *out_axes)`` (a dense or conv kernel has one output
  axis, ``nnx.LinearGeneral`` may have several): the stats fit when some split
  has ``d_in`` input and ``d_out`` output entries. With the fewest output axes
  first, a size-1 axis at the split goes to the inputs.
  """
  for n in range(1, len(kernel_shape) + 1):
    if math.prod(kernel_shape[-n:]) == d_out and math.prod(kernel_shape[:-n]) == d_in:
      return n
  return None


def covered(layers: list[Layer]) -> set[int]:
  """Indices of the leaves the layers precondition (kernels and biases)."""
  return {i for layer in layers for i in (layer.kernel, layer.bias) if i is not None}


# Curvature rows.


def rows_used(
  inputs_shape: tuple[int, ...], curvature_batch_size: int | None, weight_sharing: str = "expand"
) -> int:
  """Rows the curvature uses: examples (after subsampling), times positions with ``"expand"``."""
  examples = inputs_shape[0]
  if curvature_batch_size is not None:
    examples = min(examples, curvature_batch_size)
  positions = math.prod(inputs_shape[1:-1]) if weight_sharing == "expand" else 1
  return examples * positions


def shape(
  stats: DenseStats,
  has_bias: bool,
  curvature_batch_size: int | None,
  weight_sharing: str = "expand",
) -> LayerShape:
  """The static shape of a layer's solve (shapes only: ``jax.ShapeDtypeStruct`` works)."""
  return LayerShape(
    rows_used(stats.inputs.shape, curvature_batch_size, weight_sharing),
    stats.inputs.shape[-1] + int(has_bias),
    stats.output_grads.shape[-1],
  )


def to_rows(x: jax.Array) -> jax.Array:
  """Flattens ``(..., d)`` to ``(rows, d)``."""
  return x.reshape(-1, x.shape[-1])


def append_ones(a: jax.Array) -> jax.Array:
  """Appends the homogeneous coordinate (a column of ones) to ``(rows, d)``."""
  # ones_like keeps a's sharding (a mesh with explicit axes rejects mixed operands).
  return jnp.concatenate([a, jnp.ones_like(a[:, :1])], axis=1)


def factor_scales(stats: DenseStats) -> tuple[float, float]:
  """Static scales ``(s_A, s_G) = (1 / rows, 1 / examples)`` from the stats' shapes."""
  return 1.0 / math.prod(stats.inputs.shape[:-1]), 1.0 / stats.inputs.shape[0]


class CurvatureRows(NamedTuple):
  """A layer's curvature data: ``A = scale_a a^T a`` and ``G = scale_g g^T g``."""

  a: jax.Array  # rows x d_A
  g: jax.Array  # rows x d_G
  scale_a: float
  scale_g: float


def reduced(stats: DenseStats) -> DenseStats:
  """K-FAC-reduce's rows: each example's inputs averaged, its output gradients summed, over
  its positions (``(examples, d)`` each; unchanged without positions)."""
  a, g = stats.inputs, stats.output_grads
  axes = tuple(range(1, a.ndim - 1))
  return DenseStats(jnp.mean(a, axis=axes), jnp.sum(g, axis=axes))


def curvature_rows(
  stats: DenseStats,
  has_bias: bool,
  curvature_batch_size: int | None,
  dtype,
  weight_sharing: str = "expand",
) -> CurvatureRows:
  """The rows of the first ``curvature_batch_size`` examples, in ``dtype``.

  With ``weight_sharing="reduce"`` each example is one row (:func:`reduced`), so ``A =
  a^T a / examples`` and ``G = g^T g / examples`` of the reduced rows.
  """
  a, g = stats.inputs, stats.output_grads
  if curvature_batch_size is not None:
    a, g = a[:curvature_batch_size], g[:curvature_batch_size]
  if weight_sharing == "reduce":
    a, g = reduced(DenseStats(a.astype(dtype), g.astype(dtype)))
  scale_a, scale_g = factor_scales(DenseStats(a, g))
  a = to_rows(a).astype(dtype)
  if has_bias:
    a = append_ones(a)
  return CurvatureRows(a, to_rows(g).astype(dtype), scale_a, scale_g)


# The matrix layout.


def as_matrix(leaves: list[jax.Array], layer: Layer, dtype) -> jax.Array:
  """The layer's kernel (and bias as the last row) as one ``d_A x d_G`` matrix."""
  d_out = layer.stats.output_grads.shape[-1]
  m = leaves[layer.kernel].reshape(-1, d_out).astype(dtype)
  if layer.bias is not None:
    m = jnp.concatenate([m, leaves[layer.bias].reshape(1, d_out).astype(dtype)], 0)
  return m


def from_matrix(leaves: list[jax.Array], layer: Layer, m: jax.Array) -> dict[int, jax.Array]:
  """``{leaf index: leaf}``: ``m`` split back into the kernel and bias shapes and dtypes."""
  kernel = leaves[layer.kernel]
  out = {layer.kernel: m[: kernel.size // m.shape[1]].reshape(kernel.shape).astype(kernel.dtype)}
  if layer.bias is not None:
    bias = leaves[layer.bias]
    out[layer.bias] = m[-1].reshape(bias.shape).astype(bias.dtype)
  return out
