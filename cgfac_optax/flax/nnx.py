"""NNX: loss, gradients and CG-FAC layer stats of an unchanged ``nnx.Module``.

For the duration of one forward pass, ``__call__`` of every captured layer
class in the model (``nnx.Linear``, ``nnx.LinearGeneral`` (the projections of
``nnx.MultiHeadAttention``), ``nnx.Conv``, ``nnx.Einsum`` when its equation is a
dense map, and any class added with :func:`~cgfac_optax.flax.register_rule`) is
wrapped: the wrapper records the
call's input and adds a zero perturbation to its output. The classes are
restored as soon as the forward pass has been traced. A captured layer called
inside a JAX or NNX transformation within the model (``nnx.scan``,
``nnx.vmap``, ``nnx.remat``, ...) raises an error naming the layer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from flax import nnx
from flax.nnx import tracers

from cgfac_optax import _layers, _losses
from cgfac_optax._quadratic import CurvatureModel
from cgfac_optax.flax import _capture
from cgfac_optax.flax._rules import find_rule

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
    a = _capture.apply_rule(rule.inputs, self, inputs, path)
    y = call(self, inputs, *args, **kwargs)
    key = capture.recorder.add(path, self, rule, a, y)
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


def nnx_value_grad_and_stats(
  model: nnx.Module,
  inputs: Any,
  targets: jax.Array,
  rng: jax.Array | None = None,
  *,
  loss: str = "softmax_cross_entropy",
  fisher: str = "sampled",
  weights: jax.Array | None = None,
  curvature_rows: int | None = None,
) -> tuple[jax.Array, nnx.State, dict]:
  """Loss, gradients and CG-FAC ``layer_stats`` of an NNX model in one pass.

  One forward pass of ``model(inputs)`` and one backward pass (empirical
  Fisher) or two backward passes through the same vjp (sampled Fisher, the
  default). Losses, the per-example scaling and ``weights`` are as in
  :func:`cgfac_optax.flax.value_grad_and_stats`. Non-parameter state the
  forward pass changes (RNG counters, batch statistics) is written back to
  ``model``, as ``nnx.grad`` does.

  With ``curvature_rows=k`` the stats are those of the batch's first ``k``
  examples alone, as in :func:`cgfac_optax.flax.value_grad_and_stats`: for the
  sampled Fisher, one forward and backward pass of the whole batch (loss and
  gradients) and one forward and backward pass of the first ``k`` examples
  (stats) instead of a second backward pass over the whole batch; for the
  empirical Fisher, the first ``k`` rows of the one backward pass. The stats
  equal those of this function on ``inputs``, ``targets`` and ``weights``
  sliced to their first ``k`` examples with the same ``rng``. The subsample
  pass starts from the model's state before the call and its state changes
  are dropped: what is written back to ``model`` is the whole batch's, the
  same as without ``curvature_rows``. Set ``k`` to the optimizer's
  ``curvature_batch_size`` (512 in ``cgfac()``); :func:`nnx_curvature_model`
  is separate and stays on the whole batch.

  Args:
    model: the NNX module, called as ``model(inputs)``.
    inputs: the batch's inputs.
    targets: the batch's targets (see the loss kinds).
    rng: PRNG key for the sampled Fisher (required for ``fisher="sampled"``).
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
      ``"squared_error"``.
    fisher: ``"sampled"`` (true Fisher) or ``"empirical"``.
    weights: optional per-example weights ``(examples,)``.
    curvature_rows: ``None`` (stats of the whole batch, default) or ``k``, an
      int from 1 to the batch size: stats of the batch's first ``k`` examples.

  Returns:
    ``(loss, grads, stats)``: the weighted-mean loss, its gradient as an
    ``nnx.State`` of the ``nnx.Param`` variables (like ``nnx.grad``), and the
    stats as nested dicts keyed by each layer's path (``{"layers": {0:
    DenseStats}}``), for ``optimizer.update(model, grads, layer_stats=stats)``.

  Raises:
    ValueError: for an unknown loss or Fisher, targets of the wrong shape, a
      layer called inside a transformation, a model without a captured layer,
      or ``curvature_rows`` that is not an int from 1 to the batch size.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import cgfac_optax as cgfac
    >>> from cgfac_optax import flax as cflax
    >>> model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, cgfac.cgfac(0.1, 1e-2), wrt=nnx.Param)
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> loss, grads, stats = cflax.nnx_value_grad_and_stats(model, x, y, jax.random.key(1))
    >>> _ = optimizer.update(model, grads, layer_stats=stats)
  """
  _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  classes = {type(m) for _, m in nnx.iter_modules(model) if find_rule(m) is not None}

  def forward_of(batch):
    def forward(p, perturbations, recorder):
      # Fresh Variables for the non-parameter state, owned by this trace, so the
      # forward pass may update them (batch statistics, RNG counts).
      module = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))
      paths = {}
      for path, m in nnx.iter_modules(module):
        if find_rule(m) is not None:
          paths[id(m)] = path
          # A static attribute: it survives the split/merge of NNX transformations,
          # so a copy of the layer called inside one can be named in the error.
          setattr(m, _PATH_ATTRIBUTE, path)
      capture = _Capture(paths, recorder, perturbations)
      with _wrapped_calls(classes, capture):
        outputs = module(batch)
      _, _, new_rest = nnx.split(module, nnx.Param, ...)
      return outputs, capture.inputs, new_rest

    return forward

  value, grads, stats, new_rest = _capture.run(
    forward_of(inputs),
    params,
    targets,
    rng,
    loss=loss,
    fisher=fisher,
    weights=weights,
    rows=curvature_rows,
    head=lambda k: forward_of(jax.tree.map(lambda x: x[:k], inputs)),
  )
  nnx.update(model, new_rest)
  return value, grads, stats


def nnx_curvature_model(
  model: nnx.Module, inputs: Any, *, loss: str, rows: int | None = None
) -> CurvatureModel:
  """The :class:`~cgfac_optax.CurvatureModel` of an NNX model on a batch's first ``rows`` examples.

  Its ``outputs_fn`` takes the model's ``nnx.Param`` state (what ``nnx.Optimizer``
  passes to ``update`` as ``params``) and runs a copy of the model with it, so the
  model itself is not changed. Leave ``rows`` unset (the whole batch), as for
  :func:`curvature_model`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from cgfac_optax import flax as cflax
    >>> model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    >>> cm = cflax.nnx_curvature_model(model, jnp.ones((8, 5)), loss="squared_error", rows=4)
    >>> cm.outputs_fn(nnx.state(model, nnx.Param)).shape
    (4, 3)
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  subset = inputs if rows is None else jax.tree.map(lambda x: x[:rows], inputs)
  return CurvatureModel(lambda p: nnx.merge(graphdef, p, rest)(subset), loss)
