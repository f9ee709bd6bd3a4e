"""The shared engine: one forward, one or two backward passes, layer stats out.

A framework front end (Linen, NNX) supplies ``forward(params, perturbations,
recorder) -> (outputs, inputs, aux)``: it runs the model, and for every call of
a captured layer it records the layer inputs ``a`` under the call's key in
``inputs``, tells the :class:`Recorder` about the call, and adds
``perturbations[key]`` (zeros) to the call's output (``recorder.planned[key]``
says which layer and call a key belongs to). The gradient with respect
to a zero perturbation is the gradient with respect to that output, so one
``jax.vjp`` gives the parameter gradients and every layer's output gradient.

The engine runs ``forward`` once under ``jax.eval_shape`` to learn the calls
and their output shapes (tracing only, no compute), then once under
``jax.vjp``. The sampled Fisher pulls a second cotangent (from targets drawn
from the model's predictive distribution) back through the same vjp: one extra
backward pass, no second forward. With ``rows=k`` (the front ends'
``curvature_rows``) the sampled Fisher instead takes the loss and gradients
from one plain forward and backward pass of the whole batch, and the stats
from a separate forward under ``jax.vjp`` of the batch's first ``k`` examples,
pulled back once with the sampled cotangent; the empirical Fisher keeps its one
pass and cuts the stats to the first ``k`` examples.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _layers, _losses
from cgfac_optax._layers import DenseStats, path_str
from cgfac_optax.flax._rules import RULES


class Use(NamedTuple):
  """One captured call of a layer (static information only)."""

  path: tuple  # the layer's path in the params tree
  index: int  # the call's rank among the calls of this layer in one forward pass
  output_grads: Callable[[jax.Array], jax.Array]  # dy -> g, the layer's rule
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

  def add(self, path: tuple, module: Any, rule, a: jax.Array, y: jax.Array) -> str:
    index = self.next_index(path)
    self._count[path] = index + 1
    key = use_key(path, index)
    self.uses[key] = Use(
      path,
      index,
      lambda dy: rule.output_grads(module, dy),
      tuple(a.shape),
      jax.ShapeDtypeStruct(y.shape, y.dtype),
    )
    return key


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


def _example_factor(weights, examples: int, dtype, empirical: bool):
  """Per-example factor that turns a vjp's output gradients into stats.

  Unweighted: the mean-loss cotangent gives ``g_j / B``, so the factor is ``B``
  (empirical); the sampled cotangent is built per example already (factor 1).
  Weighted: the stats' per-example output gradient is ``sqrt(B w_j / W)`` times
  example ``j``'s own gradient (``W = sum w``), so that ``G`` is the weighted
  mean ``sum_j w_j g_j g_j^T / W``; the mean-loss cotangent carries ``w_j / W``.
  """
  if weights is None:
    return jnp.asarray(examples if empirical else 1.0, dtype)
  w = weights.astype(dtype)
  total = jnp.sum(w)
  safe = jnp.where(w > 0, w, 1.0)
  scale = jnp.sqrt(examples * total / safe) if empirical else jnp.sqrt(examples * safe / total)
  return jnp.where(w > 0, scale, 0.0)


def _head_scale(weights, examples: int, rows: int, dtype):
  """Scale from the whole batch's stats output gradients to those of its first ``rows`` alone.

  The whole batch's stats output gradient of example ``j`` is ``sqrt(B w_j / W)`` times its
  own loss gradient; that of a batch of the first ``rows`` examples with ``weights[:rows]`` is
  ``sqrt(rows w_j / W_rows)``, ``W_rows`` the sum of those weights: one scale for every row,
  ``sqrt(rows W / (B W_rows))`` (``0`` when ``W_rows = 0``; ``None``, no scale, unweighted).
  """
  if weights is None:
    return None
  w = weights.astype(dtype)
  head = jnp.sum(w[:rows])
  safe = jnp.where(head > 0, head, 1.0)
  return jnp.where(head > 0, jnp.sqrt(rows * jnp.sum(w) / (examples * safe)), 0.0)


def check_rows(rows, examples: int | None = None) -> None:
  """Raises unless ``rows`` is ``None`` or an int from 1 to ``examples`` (when given)."""
  if rows is None:
    return
  integer = isinstance(rows, numbers.Integral) and not isinstance(rows, bool)
  if examples is None:
    if not integer or rows < 1:
      raise ValueError(
        f"curvature_rows must be None or a positive int (a number of examples), got {rows!r}"
      )
  elif not integer or not 1 <= rows <= examples:
    raise ValueError(
      f"curvature_rows must be None or an int from 1 to the batch size ({examples} examples), "
      f"got {rows!r}"
    )


def _scale_rows(x: jax.Array, factor: jax.Array) -> jax.Array:
  if factor.ndim == 0:
    return x * factor.astype(x.dtype)
  return x * factor.reshape(factor.shape + (1,) * (x.ndim - 1)).astype(x.dtype)


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


def _shape_pass(forward: Callable, params: Any, kind, loss: str, targets) -> tuple[Recorder, int]:
  """Traces ``forward`` once for shapes only: the captured calls and the number of examples.

  Raises:
    ValueError: when the targets do not fit the outputs, no layer is captured, or a layer
      runs inside a mapping transformation (its inputs leave the forward pass reshaped).
  """
  shapes = Recorder()
  outputs_shape, inputs_shape, _ = jax.eval_shape(lambda p: forward(p, None, shapes), params)
  _losses.check_targets(kind, loss, outputs_shape, targets)
  if not shapes.uses:
    names = sorted(_class_name(cls) for cls in RULES)
    raise ValueError(
      "the model calls no layer whose curvature can be captured; supported layer classes "
      f"(and subclasses): {names}"
    )
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
  return shapes, outputs_shape.shape[0]


def _mean_loss(kind, targets, weights):
  """``outputs -> loss``: the (weighted) batch mean of the per-example losses."""

  def mean_loss(y):
    per_example = kind.per_example(y, targets)
    if weights is None:
      return jnp.mean(per_example)
    w = weights.astype(per_example.dtype)
    return jnp.sum(w * per_example) / jnp.sum(w)

  return mean_loss


def _loss_pass(forward, params, kind, targets, weights):
  """One plain forward and backward pass (no perturbations): ``(loss, grads, aux)``."""
  mean_loss = _mean_loss(kind, targets, weights)

  def value(p):
    outputs, _, aux = forward(p, None, Recorder())
    return mean_loss(outputs), aux

  (loss, aux), grads = jax.value_and_grad(value, has_aux=True)(params)
  return loss, grads, aux


def _vjp_pass(
  forward,
  params,
  shapes: Recorder,
  kind,
  targets,
  rng,
  *,
  fisher,
  weights,
  examples,
  loss_grads=True,
):
  """One forward under ``jax.vjp``, pulled back once or twice.

  Returns ``(loss, grads, output_grads, inputs, aux, recorder)``: ``output_grads`` by call
  key, the per-example loss gradients (empirical) or those of sampled targets. Without
  ``loss_grads`` (sampled only), the loss and ``grads`` are ``None`` and the vjp is pulled
  back once, with the sampled cotangent.
  """
  perturbations = {
    key: jnp.zeros(use.output.shape, use.output.dtype) for key, use in shapes.uses.items()
  }
  recorder = Recorder(planned=shapes.uses)
  outputs, vjp_fn, (inputs, aux) = jax.vjp(
    lambda p, e: _split_aux(forward(p, e, recorder)), params, perturbations, has_aux=True
  )
  if recorder.uses.keys() != shapes.uses.keys():
    raise RuntimeError(
      "the model called different layers in two traces of the same forward pass: "
      f"{sorted(shapes.uses)} then {sorted(recorder.uses)}"
    )

  value = grads = output_grads = None
  if loss_grads:
    value, cotangent = jax.value_and_grad(_mean_loss(kind, targets, weights))(outputs)
    grads, output_grads = vjp_fn(cotangent)
  dtype = outputs.dtype
  if fisher == "sampled":
    sampled = jax.lax.stop_gradient(kind.sample(rng, outputs))
    c = _example_factor(weights, examples, dtype, empirical=False)
    cotangent = jax.grad(lambda y: jnp.sum(c * kind.per_example(y, sampled)))(outputs)
    _, output_grads = vjp_fn(cotangent)
  else:
    c = _example_factor(weights, examples, dtype, empirical=True)
    output_grads = {k: _scale_rows(v, c) for k, v in output_grads.items()}
  return value, grads, output_grads, inputs, aux, recorder


def _assemble_stats(recorder: Recorder, inputs, output_grads, params, examples: int):
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


def run(
  forward: Callable,
  params: Any,
  targets: jax.Array,
  rng: jax.Array | None,
  *,
  loss: str,
  fisher: str,
  weights: jax.Array | None,
  rows: int | None = None,
  head: Callable[[int], Callable] | None = None,
):
  """Loss, gradients, layer stats and the forward's aux output.

  Args:
    forward: ``(params, perturbations or None, recorder) -> (outputs, inputs, aux)``.
    params: the parameters to differentiate.
    targets: the batch's targets (labels for the empirical Fisher and the loss).
    rng: PRNG key for the sampled Fisher.
    loss: a name in ``_losses.LOSSES``.
    fisher: ``"empirical"`` or ``"sampled"``.
    weights: optional per-example weights ``(examples,)``, ``>= 0`` with a positive sum.
    rows: ``None`` (stats of the whole batch) or ``k`` in ``[1, examples]``: the stats are
      those :func:`run` gives for the batch's first ``k`` examples alone (their inputs,
      ``targets[:k]``, ``weights[:k]``, the same ``rng``), while the loss, the gradients and
      ``aux`` stay those of the whole batch. Sampled Fisher: ``head(k)``'s forward pass under
      ``jax.vjp``, pulled back once, after one plain forward and backward pass of the whole
      batch. Empirical: the first ``k`` rows of the whole batch's stats, rescaled (one scalar,
      see :func:`_head_scale`). ``k = examples`` is the same as ``None``.
    head: ``k -> forward`` of the batch's first ``k`` examples (the inputs sliced along their
      leading axis); needed for ``rows`` with the sampled Fisher.

  Returns:
    ``(loss, grads, stats, aux)``.
  """
  kind = _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  if fisher == "sampled" and rng is None:
    raise ValueError(
      "fisher='sampled' draws targets from the model's predictive distribution and needs a "
      "PRNG key: pass rng=jax.random.key(...) (or use fisher='empirical')"
    )
  targets = jnp.asarray(targets)
  shapes, examples = _shape_pass(forward, params, kind, loss, targets)
  if weights is not None:
    weights = jnp.asarray(weights)
    if weights.shape != (examples,):
      raise ValueError(f"weights must have shape ({examples},), got {weights.shape}")
  check_rows(rows, examples)
  if rows == examples:
    rows = None
  if rows is not None and fisher == "sampled":
    if head is None:
      raise TypeError("rows with the sampled Fisher needs head, the forward of the first rows")
    value, grads, aux = _loss_pass(forward, params, kind, targets, weights)
    head_forward, head_targets = head(rows), targets[:rows]
    head_weights = None if weights is None else weights[:rows]
    head_shapes, _ = _shape_pass(head_forward, params, kind, loss, head_targets)
    _, _, output_grads, inputs, _, recorder = _vjp_pass(
      head_forward,
      params,
      head_shapes,
      kind,
      head_targets,
      rng,
      fisher=fisher,
      weights=head_weights,
      examples=rows,
      loss_grads=False,
    )
    return value, grads, _assemble_stats(recorder, inputs, output_grads, params, rows), aux
  value, grads, output_grads, inputs, aux, recorder = _vjp_pass(
    forward, params, shapes, kind, targets, rng, fisher=fisher, weights=weights, examples=examples
  )
  stats = _assemble_stats(recorder, inputs, output_grads, params, examples)
  if rows is not None:  # empirical: the first rows of the one backward pass
    stats = jax.tree.map(
      lambda s: _head_stats(s, weights, examples, rows),
      stats,
      is_leaf=lambda x: isinstance(x, DenseStats),
    )
  return value, grads, stats, aux


def _head_stats(stats: DenseStats, weights, examples: int, rows: int) -> DenseStats:
  """A layer's stats of the first ``rows`` examples, cut from those of the whole batch."""
  g = stats.output_grads[:rows]
  scale = _head_scale(weights, examples, rows, g.dtype)
  return DenseStats(stats.inputs[:rows], g if scale is None else _scale_rows(g, scale))


def _split_aux(result):
  outputs, inputs, aux = result
  return outputs, (inputs, aux)
