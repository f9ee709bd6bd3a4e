"""NNX: the loss, the gradients and everything ``update`` reads, for an unchanged ``nnx.Module``.

For the duration of one forward pass, ``__call__`` of every captured layer
class in the model (``nnx.Linear``, ``nnx.LinearGeneral`` (the projections of
``nnx.MultiHeadAttention``), ``nnx.Conv``, ``nnx.Einsum`` when its equation is a
dense map, and any class added with :func:`~cgfac_optax.flax.register_rule`) is
wrapped: the wrapper records the call's input and adds a zero perturbation to
its output. The classes are restored as soon as the forward pass has been
traced. A captured layer called inside a JAX or NNX transformation within the
model (``nnx.scan``, ``nnx.vmap``, ``nnx.remat``, ...) raises an error naming
the layer.

Every pass runs on fresh copies of the model's state (``nnx.merge`` of its
arrays), so nothing the model changes as it runs (batch statistics, RNG counts)
touches the caller's Variables from inside another trace; the loss pass's
changes are written back to the model afterwards, as ``nnx.grad`` does, and
the other passes' are dropped.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from flax import nnx
from flax.nnx import graph, tracers

from cgfac_optax import _capture, _layers, _losses
from cgfac_optax._capture import DEFAULT_CURVATURE_BATCH_SIZE, DEFAULT_QUADRATIC_BATCH_SIZE
from cgfac_optax.flax._rules import apply_rule, find_rule, no_layers_message

_ACTIVE: list[_Capture] = []
_PATH_ATTRIBUTE = "_cgfac_path"


class _Capture:
  """What the wrapped calls of one forward pass need and what they record."""

  def __init__(self, paths: dict[int, tuple], recorder, perturbations):
    self.paths = paths  # id(layer) -> its path in the model
    self.recorder = recorder
    self.perturbations = perturbations
    self.inputs: dict[str, jax.Array] = {}
    self.trace = tracers.current_jax_trace()


def _wrap(call):
  def __call__(self, inputs, *args, **kwargs):
    capture = _ACTIVE[-1] if _ACTIVE else None
    path = getattr(self, _PATH_ATTRIBUTE, None)
    if capture is None or path is None:  # not a layer of the model being captured
      return call(self, inputs, *args, **kwargs)
    # A copy of the layer (made by an NNX transformation) or a different trace:
    # the layer runs inside a transformation and its rows cannot leave it.
    if capture.paths.get(id(self)) != path or tracers.current_jax_trace() != capture.trace:
      raise ValueError(
        f"layer {_layers.path_str(path)!r} ({type(self).__name__}) is called inside a "
        "JAX/NNX transformation within the model (nnx.scan, nnx.vmap, nnx.remat, "
        "jax.lax.scan, ...), where its curvature stats cannot be captured; call the layer "
        "outside the transformation"
      )
    rule = find_rule(self)
    a = apply_rule(rule.inputs, self, inputs, path)
    y = call(self, inputs, *args, **kwargs)
    key = capture.recorder.add(path, a, y, lambda dy: rule.output_grads(self, dy))
    capture.inputs[key] = a
    if capture.perturbations is not None:
      y = y + capture.perturbations[key]
    return y

  __call__.__wrapped__ = call
  return __call__


@contextlib.contextmanager
def _wrapped_calls(classes: set[type], capture: _Capture):
  # Resolve every original before patching, so a registered subclass that
  # inherits __call__ wraps the original and never a wrapper (no double capture).
  resolved = {cls: cls.__call__ for cls in classes}
  own = {cls: cls.__dict__.get("__call__") for cls in classes}
  _ACTIVE.append(capture)
  try:
    for cls in classes:
      cls.__call__ = _wrap(resolved[cls])
    yield
  finally:
    for cls in classes:
      if own[cls] is None:
        del cls.__call__
      else:
        cls.__call__ = own[cls]
    _ACTIVE.pop()


def _fresh(state):
  """New Variables holding the same arrays, owned by whichever trace calls this."""
  return jax.tree.map(lambda v: v, state)


def _model(model: nnx.Module, call_kwargs: dict) -> tuple[_capture.Model, Any, Any]:
  """The engine's model of ``model(inputs, **call_kwargs)``, its params, and a write-back.

  NNX objects among the call's arguments (an ``nnx.Rngs`` for dropout) are split
  like the model's non-parameter state: copied into every pass, and the loss
  pass's changes written back.
  """
  nodes = {k: v for k, v in call_kwargs.items() if graph.is_graph_node(v)}
  plain = {k: v for k, v in call_kwargs.items() if k not in nodes}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  nodes_def, nodes_state = nnx.split(nodes)
  # The split's States hold the model's own Variables, which the write-back changes; the passes
  # that ``extra`` runs later (the stats, the curvature model, ``value_fn``) must see the state
  # the loss pass saw (the same RNG counts, so the same dropout masks), not the written-back one.
  params, rest, nodes_state = _fresh(params), _fresh(rest), _fresh(nodes_state)
  classes = {type(m) for _, m in nnx.iter_modules(model) if find_rule(m) is not None}

  def merged(p):
    return nnx.merge(graphdef, _fresh(p), _fresh(rest)), nnx.merge(nodes_def, _fresh(nodes_state))

  def state_of(module, node_kwargs):
    return nnx.split(module, nnx.Param, ...)[2], nnx.split(node_kwargs)[1]

  def run(p, inputs):
    module, node_kwargs = merged(p)
    out = module(inputs, **node_kwargs, **plain)
    return out, state_of(module, node_kwargs)

  def capture(p, inputs, perturbations, recorder):
    module, node_kwargs = merged(p)
    paths = {}
    for path, m in nnx.iter_modules(module):
      if find_rule(m) is not None:
        paths[id(m)] = path
        # A static attribute: it survives the split/merge of NNX transformations,
        # so a copy of the layer called inside one can be named in the error.
        setattr(m, _PATH_ATTRIBUTE, path)
    active = _Capture(paths, recorder, perturbations)
    with _wrapped_calls(classes, active):
      out = module(inputs, **node_kwargs, **plain)
    return out, active.inputs, None

  def write_back(changed):
    nnx.update(model, changed[0])
    nnx.update(nodes, changed[1])

  return _capture.Model(run, capture, no_layers_message()), params, write_back


def nnx_value_grad_and_extra(
  model: nnx.Module,
  inputs: Any,
  targets: jax.Array,
  rng: jax.Array | None = None,
  *,
  loss: str = "softmax_cross_entropy",
  fisher: str = "sampled",
  weights: jax.Array | None = None,
  curvature_batch_size: int | float | None = DEFAULT_CURVATURE_BATCH_SIZE,
  quadratic_batch_size: int | float | None = DEFAULT_QUADRATIC_BATCH_SIZE,
  **call_kwargs,
) -> tuple[jax.Array, nnx.State, dict]:
  """The loss, the gradients and ``extra``, everything ``tx.update`` reads, of an NNX model.

  For ``optimizer.update(model, grads, **extra)`` (``nnx.Optimizer`` passes
  ``extra`` on to ``tx.update``). The loss and gradients come from one forward
  and one backward pass of ``model(inputs, **call_kwargs)``; ``extra`` holds
  ``layer_stats``, ``curvature_model``, ``value`` and ``value_fn``, as for
  :func:`cgfac_optax.flax.value_grad_and_extra` (Linen), which documents the
  losses, the Fisher, ``weights``, ``curvature_batch_size`` and
  ``quadratic_batch_size``. The
  non-parameter state the loss pass changes (batch statistics, RNG counts,
  of the model and of NNX objects among ``call_kwargs``) is written back, as
  ``nnx.grad`` does; the other passes run on copies.

  Args:
    model: the NNX module, called as ``model(inputs, **call_kwargs)``.
    inputs: the batch's inputs (a pytree of arrays, leading axis the examples).
    targets: the batch's targets (see the loss kinds).
    rng: PRNG key for the sampled Fisher (required for ``fisher="sampled"``).
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
      ``"squared_error"``.
    fisher: ``"sampled"`` (true Fisher) or ``"empirical"``.
    weights: optional per-example weights ``(examples,)``.
    curvature_batch_size: how many of the batch's first examples feed the
      curvature stats: an int, a fraction of the batch (a float in ``(0,
      1]``), or ``None`` for all.
    quadratic_batch_size: the same for the quadratic model's examples.
    **call_kwargs: further arguments of the model's ``__call__`` (``train=True``,
      ``rngs=nnx.Rngs(dropout=key)``), the same in every pass.

  Returns:
    ``(loss, grads, extra)``: the weighted-mean loss, its gradient as an
    ``nnx.State`` of the ``nnx.Param`` variables (like ``nnx.grad``), and the
    keyword arguments of ``update``.

  Raises:
    ValueError: for an unknown loss or Fisher, targets of the wrong shape, a
      layer called inside a transformation, a model without a captured layer,
      or a bad ``curvature_batch_size``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import cgfac_optax as cgfac
    >>> from cgfac_optax import flax as cflax
    >>> model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, cgfac.cgfac(), wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> loss, grads, extra = cflax.nnx_value_grad_and_extra(model, x, y, jax.random.key(1))
    >>> _ = optimizer.update(model, grads, **extra)
  """
  _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  _capture.check_batch_sizes(curvature_batch_size, quadratic_batch_size)
  engine, params, write_back = _model(model, call_kwargs)
  value, grads, extra, changed = _capture.value_grad_and_extra(
    engine,
    params,
    inputs,
    targets,
    rng,
    loss=loss,
    fisher=fisher,
    weights=weights,
    curvature_batch_size=curvature_batch_size,
    quadratic_batch_size=quadratic_batch_size,
  )
  write_back(changed)
  return value, grads, extra
