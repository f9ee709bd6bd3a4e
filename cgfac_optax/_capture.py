"""The capture engine: loss, gradients, and everything ``update`` reads, from any model.

A *front end* (Linen, NNX, or a traced JAX function) describes the model by a
:class:`Model`: ``run(params, inputs) -> (outputs, aux)``, the model as it is,
and ``capture(params, inputs, perturbations, recorder) -> (outputs, layer_inputs,
aux)``, the same model with every captured layer call recorded: its input rows
``a`` under the call's key in ``layer_inputs``, the call told to the
:class:`Recorder`, and ``perturbations[key]`` (zeros) added to its output. The
gradient with respect to a zero perturbation is the gradient with respect to
that output, so one ``jax.vjp`` over the perturbations gives every layer's
output gradients ``g``. ``aux`` is what the model changes as it runs (Linen's
mutable collections, NNX's non-parameter state).

:func:`value_grad_and_extra` returns the loss and gradients of one plain pass
(``jax.value_and_grad`` of ``run``, as a first-order optimizer would compute
them) and ``extra``, the keyword arguments of ``tx.update``:

- ``layer_stats``: a function of no arguments returning the layers'
  :class:`~cgfac_optax.DenseStats` from one forward pass of the batch's first
  ``curvature_batch_size`` examples under ``jax.vjp`` and one pullback of the
  Fisher's cotangent (targets drawn from the model for the sampled Fisher, the
  batch's own for the empirical). The optimizer calls it only on the steps
  that update its curvature, so the pass costs nothing on the others;
- ``curvature_model``: the :class:`~cgfac_optax.CurvatureModel` of the batch's
  first ``quadratic_batch_size`` examples (the quadratic model's exact Fisher
  products, on every step);
- ``value`` and ``value_fn``: the loss, and the loss of the same batch at other
  parameters (the Levenberg-Marquardt reduction ratio).

``value_fn``, the curvature model and the stats run the model as the loss pass
did (same inputs, same call arguments, so the same dropout masks where the
examples are the same), and whatever they change of the model's state is
dropped.

Stats per example: row ``j`` of a layer's output gradients is the gradient of
example ``j``'s own loss (not of the batch mean), times ``sqrt(k w_j / W)``
with weights (``W`` the sum of the ``k`` examples' weights), so that ``G`` is
their weighted mean. Where the outputs have ``P`` positions (a language model's
tokens), an example's loss is the mean of its positions' losses, whose gradients
carry ``1/P``; the rows are then multiplied by ``sqrt(P)`` as well, so that
``G`` is the mean over positions of their output Fisher, as in the curvature of
the loss itself (the quadratic model's), and not ``1/P`` of it. The damping then
means the same thing with and without positions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _layers, _losses
from cgfac_optax._layers import DenseStats, path_str
from cgfac_optax._quadratic import CurvatureModel

# Examples of the batch whose stats feed the curvature (the sampled-Fisher pass, the factors and
# the quadratic model): a batch larger than this pays for this many.
DEFAULT_CURVATURE_BATCH_SIZE = 512

# The share of the batch the quadratic model's Jacobian-vector products run on. They run on every
# step (the stats on the reading steps only), so their examples set most of what a step costs
# beyond the loss pass: a quarter keeps that a fixed share of it at any batch size.
DEFAULT_QUADRATIC_BATCH_SIZE = 0.25


def identity(x: jax.Array) -> jax.Array:
  return x


class Use(NamedTuple):
  """One captured call of a layer (static information only)."""

  path: tuple  # the layer's path in the params tree
  index: int  # the call's rank among the calls of this layer in one forward pass
  output_grads: Callable[[jax.Array], jax.Array]  # dy -> g, (examples, ..., d_out)
  inputs_shape: tuple  # shape of a as seen inside the call
  output: jax.ShapeDtypeStruct  # the call's output, for its zero perturbation


def use_key(path: tuple, index: int) -> str:
  return f"{path_str(path)}#{index}"


class Recorder:
  """Collects the static description of the captured calls during one trace."""

  def __init__(self, planned: dict[str, Use] | None = None):
    self.planned = planned  # the calls found by the shape pass, in the real pass
    self.uses: dict[str, Use] = {}
    self._count: dict[tuple, int] = {}

  def next_index(self, path: tuple) -> int:
    """The index of the next call of ``path`` (0 for its first call)."""
    return self._count.get(path, 0)

  def add(self, path: tuple, a: jax.Array, y: jax.Array, output_grads=identity) -> str:
    """Records one call of the layer at ``path``: its rows ``a`` and output ``y``; its key."""
    index = self.next_index(path)
    self._count[path] = index + 1
    key = use_key(path, index)
    self.uses[key] = Use(
      path, index, output_grads, tuple(a.shape), jax.ShapeDtypeStruct(y.shape, y.dtype)
    )
    return key


class Model(NamedTuple):
  """A front end's description of a model (see the module docstring).

  Attributes:
    run: ``(params, inputs) -> (outputs, aux)``.
    capture: ``(params, inputs, perturbations or None, recorder) -> (outputs,
      layer_inputs, aux)``.
    no_layers: the message when the model calls no captured layer (what the
      front end captures).
  """

  run: Callable[[Any, Any], tuple[jax.Array, Any]]
  capture: Callable[[Any, Any, Any, Recorder], tuple[jax.Array, dict, Any]]
  no_layers: str


def check_curvature_batch_size(value, name: str = "curvature_batch_size") -> None:
  """Raises unless ``value`` is ``None``, a positive int, or a float in ``(0, 1]``."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    ok = False
  elif isinstance(value, numbers.Integral):
    ok = value >= 1
  else:
    ok = 0 < value <= 1
  if not ok:
    raise ValueError(
      f"{name} must be None, a positive int (a number of examples) or a float "
      f"in (0, 1] (a fraction of the batch), got {value!r}"
    )


def check_batch_sizes(curvature_batch_size, quadratic_batch_size) -> None:
  """Both of the helpers' example counts, each as :func:`check_curvature_batch_size` does."""
  check_curvature_batch_size(curvature_batch_size)
  check_curvature_batch_size(quadratic_batch_size, "quadratic_batch_size")


def curvature_rows(curvature_batch_size, examples: int) -> int:
  """How many of a batch's ``examples`` feed the curvature (at least one)."""
  if curvature_batch_size is None:
    return examples
  if isinstance(curvature_batch_size, numbers.Integral):
    return min(int(curvature_batch_size), examples)
  return max(1, min(examples, round(curvature_batch_size * examples)))


def _whole_shards(rows: int, inputs: Any, examples: int) -> int:
  """``rows`` rounded up to whole shards of the examples axis (on a mesh with Explicit axes).

  On such a mesh a slice of a sharded axis must divide among its devices; a quarter of a
  batch that is sharded eight ways may not. Elsewhere ``rows`` as it is.
  """
  shards = 1
  for x in jax.tree.leaves(inputs):
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec and spec[0] is not None:
      axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
      shards = max(shards, math.prod(sharding.mesh.shape[a] for a in axes))
  return min(examples, -(-rows // shards) * shards)


def head(tree: Any, rows: int) -> Any:
  """The first ``rows`` examples of every array (leading axis) of ``tree``."""
  return jax.tree.map(lambda x: x[:rows], tree)


def _merge_uses(path: tuple, parts: list[tuple[jax.Array, jax.Array]], examples: int):
  """Stats of a layer from all its calls: positions of every call side by side."""
  for a, g in parts:
    if a.shape[0] != examples or g.shape[0] != examples or a.shape[:-1] != g.shape[:-1]:
      raise ValueError(
        f"layer {path_str(path)!r}: inputs of shape {a.shape} and output gradients of shape "
        f"{g.shape}; both must be (examples, ..., d) with examples = {examples}, the batch "
        "size of the targets (the leading axis of every captured layer's input must be the "
        "examples axis)"
      )
  if len(parts) == 1:
    return DenseStats(*parts[0])
  a = jnp.concatenate([a.reshape(examples, -1, a.shape[-1]) for a, _ in parts], axis=1)
  g = jnp.concatenate([g.reshape(examples, -1, g.shape[-1]) for _, g in parts], axis=1)
  return DenseStats(a, g)


def _nest(flat: dict[tuple, Any]) -> Any:
  if () in flat:  # the model is itself one layer: its stats are the whole tree
    if len(flat) > 1:
      raise ValueError(
        f"the root module is a captured layer but so are {sorted(map(path_str, flat))[1:]}; "
        "a layer's stats cannot sit above another layer's"
      )
    return flat[()]
  out: dict = {}
  for path, value in flat.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


def _shape_pass(model: Model, params: Any, inputs: Any) -> Recorder:
  """Traces the capture once for shapes only (no compute): the captured calls.

  Raises:
    ValueError: when no layer is captured, or a layer runs inside a mapping
      transformation (its inputs leave the forward pass reshaped).
  """
  shapes = Recorder()
  _, inputs_shape, _ = jax.eval_shape(lambda p: model.capture(p, inputs, None, shapes), params)
  if not shapes.uses:
    raise ValueError(model.no_layers)
  for key, use in shapes.uses.items():
    seen = inputs_shape.get(key)
    if seen is None or tuple(seen.shape) != use.inputs_shape:
      raise ValueError(
        f"layer {path_str(use.path)!r} sees inputs of shape {use.inputs_shape} inside its "
        f"call but they come out of the forward pass as "
        f"{None if seen is None else tuple(seen.shape)}: the layer runs inside a "
        "transformation that maps or stacks over it (nn.scan, nn.vmap, ...), whose "
        "per-call statistics cannot be captured; call the layer outside the transformation"
      )
  return shapes


def mean_loss(kind: _losses.LossKind, outputs, targets, weights) -> jax.Array:
  """The (weighted) batch mean of the per-example losses."""
  per_example = kind.per_example(outputs, targets)
  if weights is None:
    return jnp.mean(per_example)
  w = weights.astype(per_example.dtype)
  return jnp.sum(w * per_example) / jnp.sum(w)


def _example_scale(weights, dtype) -> jax.Array:
  """``sqrt(k w_j / W)`` per example (1 unweighted): ``G`` becomes the weighted mean."""
  if weights is None:
    return jnp.ones([], dtype)
  w = weights.astype(dtype)
  total = jnp.sum(w)
  safe = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sqrt(w.shape[0] * jnp.maximum(w, 0) / safe), 0.0)


def _assemble(recorder: Recorder, inputs, output_grads, params, examples: int):
  """Each layer's :class:`DenseStats` from all its calls, nested like the params."""
  parts: dict[tuple, list] = {}
  for key, use in sorted(recorder.uses.items(), key=lambda kv: kv[1].index):
    parts.setdefault(use.path, []).append((inputs[key], use.output_grads(output_grads[key])))
  layers = set(_layers.layer_paths(params))
  stats = {}
  for path, uses in parts.items():
    if path_str(path) not in layers:
      raise ValueError(
        f"layer {path_str(path)!r} is called in the forward pass but the params have no "
        f"{path_str(path) + '/kernel'!r}; its stats would have no parameters to precondition"
      )
    stats[path] = _merge_uses(path, uses, examples)
  return _nest(stats)


class _Curvature(NamedTuple):
  """What the stats pass reads: the examples, their targets and weights, the key."""

  inputs: Any
  targets: jax.Array
  weights: jax.Array | None
  rng: jax.Array | None
  examples: int


def stats(model: Model, params, data: _Curvature, shapes: Recorder, kind, fisher: str):
  """The layers' stats: one capturing forward under ``jax.vjp``, one pullback.

  Only the perturbations are differentiated: the pullback computes the layers'
  output gradients and no parameter gradient.
  """
  zeros = {key: jnp.zeros(u.output.shape, u.output.dtype) for key, u in shapes.uses.items()}
  recorder = Recorder(planned=shapes.uses)
  capture = lambda e: model.capture(params, data.inputs, e, recorder)[:2]
  outputs, pullback, inputs = jax.vjp(capture, zeros, has_aux=True)
  if recorder.uses.keys() != shapes.uses.keys():
    raise RuntimeError(
      "the model called different layers in two traces of the same forward pass: "
      f"{sorted(shapes.uses)} then {sorted(recorder.uses)}"
    )
  targets = data.targets
  if fisher == "sampled":
    targets = jax.lax.stop_gradient(kind.sample(data.rng, outputs))
  scale = _example_scale(data.weights, outputs.dtype)
  # With positions, G is then the loss's own curvature (module docstring).
  if (positions := _losses.positions(outputs.shape)) > 1:
    scale = scale * math.sqrt(positions)
  cotangent = jax.grad(lambda y: jnp.sum(scale * kind.per_example(y, targets)))(outputs)
  (output_grads,) = pullback(cotangent)
  return _assemble(recorder, inputs, output_grads, params, data.examples)


def _check(kind, loss: str, fisher: str, rng, outputs, targets, weights) -> int:
  _losses.check_targets(kind, loss, outputs, targets)
  examples = outputs.shape[0]
  if weights is not None and weights.shape != (examples,):
    raise ValueError(f"weights must have shape ({examples},), got {weights.shape}")
  if fisher == "sampled" and rng is None:
    raise ValueError(
      "fisher='sampled' draws targets from the model's predictive distribution and needs a "
      "PRNG key: pass rng=jax.random.key(...) (or use fisher='empirical')"
    )
  return examples


def value_grad_and_extra(
  model: Model,
  params: Any,
  inputs: Any,
  targets: jax.Array,
  rng: jax.Array | None,
  *,
  loss: str,
  fisher: str,
  weights: jax.Array | None = None,
  curvature_batch_size: int | float | None = DEFAULT_CURVATURE_BATCH_SIZE,
  quadratic_batch_size: int | float | None = DEFAULT_QUADRATIC_BATCH_SIZE,
) -> tuple[jax.Array, Any, dict, Any]:
  """``(loss, grads, extra, aux)`` of ``model`` on one batch (see the module docstring).

  ``aux`` is the model's state after the loss pass. ``curvature_batch_size``: the
  first this-many examples feed the stats (a batch smaller than it uses all of
  its), or, as a float in ``(0, 1]``, that fraction of the batch; ``None`` for all.
  ``quadratic_batch_size``: the same for the quadratic model's examples.
  """
  kind = _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  check_batch_sizes(curvature_batch_size, quadratic_batch_size)
  targets = jnp.asarray(targets)
  weights = None if weights is None else jnp.asarray(weights)
  outputs_shape, _ = jax.eval_shape(model.run, params, inputs)
  examples = _check(kind, loss, fisher, rng, outputs_shape, targets, weights)

  def value(p):
    outputs, aux = model.run(p, inputs)
    return mean_loss(kind, outputs, targets, weights), aux

  (loss_value, aux), grads = jax.value_and_grad(value, has_aux=True)(params)
  rows = curvature_rows(curvature_batch_size, examples)
  data = _Curvature(
    head(inputs, rows),
    targets[:rows],
    None if weights is None else weights[:rows],
    rng,
    rows,
  )
  shapes = _shape_pass(model, params, data.inputs)
  quadratic_rows = _whole_shards(curvature_rows(quadratic_batch_size, examples), inputs, examples)
  quadratic_inputs = head(inputs, quadratic_rows)
  extra = {
    "layer_stats": lambda: stats(model, params, data, shapes, kind, fisher),
    "curvature_model": CurvatureModel(lambda p: model.run(p, quadratic_inputs)[0], loss),
    "value": loss_value,
    "value_fn": lambda p: value(p)[0],
  }
  return loss_value, grads, extra, aux
