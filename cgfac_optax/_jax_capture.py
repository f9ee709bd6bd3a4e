"""Plain JAX: the loss, the gradients and everything ``update`` reads, for a model as a function.

The model is ``apply_fn(params, inputs, **kwargs) -> outputs``, unchanged. Its
layers are found in its traced program (see :mod:`cgfac_optax._graph` for what
is matched), and the capture runs that program again with an interpreter that,
at each matched product, records the rows ``a`` of its activation and adds a
zero perturbation to its output (the gradient with respect to it is the
output gradient ``g``). Everything else is bound as traced: a ``jax.jit``,
``jax.checkpoint`` or custom-derivative function with no layer inside keeps its
boundary and its rules; one with a layer inside is run inline in the
statistics pass (the loss and gradient pass always run ``apply_fn`` itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from cgfac_optax import _capture, _graph, _jaxpr, _losses
from cgfac_optax._capture import DEFAULT_CURVATURE_BATCH_SIZE, DEFAULT_QUADRATIC_BATCH_SIZE

NO_LAYERS = (
  "no product in the model is a layer. A layer is a dot_general (no batch dimensions) or a "
  "conv_general_dilated (ungrouped, kernel HWIO) whose second operand is a parameter named "
  "'kernel', with its leading axes contracted, and whose first operand is computed from the "
  "inputs, with the examples axis first; call fn.layers(params, inputs) to see each product "
  "of the model and why it is not a layer"
)


class _Interpreter:
  """Runs a traced model, capturing each matched product."""

  def __init__(self, analysis: _graph.Analysis, recorder: _capture.Recorder, perturbations):
    self.analysis = analysis
    self.recorder = recorder
    self.perturbations = perturbations
    self.inputs: dict[str, jax.Array] = {}  # the rows a, by the use's key

  def step(self, eqn, invals: list, loc: tuple[int, ...]) -> list:
    match = self.analysis.matches.get(loc)
    if match is not None:
      return [self._capture(eqn, invals, match)]
    if loc in self.analysis.inline:
      jaxpr, consts = _jaxpr.called(eqn)
      return _jaxpr.walk(jaxpr, consts, invals, self.step, loc)
    return _jaxpr.bind(eqn, invals)

  def _capture(self, eqn, invals: list, match: _graph.Match) -> jax.Array:
    (y,) = _jaxpr.bind(eqn, invals)
    a = match.inputs(invals[0])
    key = self.recorder.add(match.path, a, y, match.output_grads)
    self.inputs[key] = a
    if self.perturbations is not None:
      y = y + self.perturbations[key]
    return y


def _trace(apply_fn: Callable, kwargs: dict, params, inputs):
  """The model's jaxpr, the tree of its outputs, and what it matches."""
  closed, out_shape = _jaxpr.trace(lambda p, x: apply_fn(p, x, **kwargs), params, inputs)
  return closed, jax.tree.structure(out_shape), _graph.match(closed, params, inputs)


def _model(apply_fn: Callable, kwargs: dict) -> _capture.Model:
  """The engine's :class:`~cgfac_optax._capture.Model` of ``apply_fn(params, inputs, **kwargs)``."""

  def run(params, inputs):
    return apply_fn(params, inputs, **kwargs), None

  def capture(params, inputs, perturbations, recorder):
    closed, out_tree, analysis = _trace(apply_fn, kwargs, params, inputs)
    interpreter = _Interpreter(analysis, recorder, perturbations)
    args = jax.tree.leaves((params, inputs))
    outputs = _jaxpr.walk(closed.jaxpr, closed.consts, args, interpreter.step)
    return jax.tree.unflatten(out_tree, outputs), interpreter.inputs, None

  return _capture.Model(run, capture, NO_LAYERS)


def value_grad_and_extra(
  apply_fn: Callable[..., jax.Array],
  *,
  loss: str = "softmax_cross_entropy",
  fisher: str = "sampled",
  curvature_batch_size: int | float | None = DEFAULT_CURVATURE_BATCH_SIZE,
  quadratic_batch_size: int | float | None = DEFAULT_QUADRATIC_BATCH_SIZE,
) -> Callable[..., tuple[jax.Array, Any, dict]]:
  r"""The loss, the gradients and ``extra``, everything ``tx.update`` reads, of a JAX function.

  ``fn = value_grad_and_extra(apply_fn, loss=...)`` returns ``fn(params,
  inputs, targets, rng=None, *, weights=None, **kwargs) -> (loss, grads,
  extra)``, to call inside a jitted step::

    loss, grads, extra = fn(params, inputs, targets, rng)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)

  ``apply_fn(params, inputs, **kwargs) -> outputs`` is the model as it is
  (``kwargs`` are passed unchanged to every pass). Its layers are found in its
  traced program: a layer is a parameter dict holding a ``kernel`` (and maybe a
  ``bias``) used in products ``inputs-derived activation x kernel``:

  - dense: ``jax.lax.dot_general`` (``x @ kernel``, ``jnp.einsum``) without
    batch dimensions that contracts the kernel's leading axes, its trailing
    axes being the outputs (Flax's layout): ``(B, T, d) @ (d, k)``,
    ``"btd,dhk->bthk"``, ``"bthk,hkd->btd"``;
  - convolution: ``jax.lax.conv_general_dilated``, ungrouped, with an ``HWIO``
    kernel, batch-first input and output and a channels-last output (Flax's
    ``nn.Conv``); its rows are the patches (any strides, padding, dilations).

  The activation's first axis must be the examples axis (as many entries as
  the inputs' leading axis). The ``bias`` of a layer must be added to its
  product's output. A kernel used in several products (a layer applied twice,
  shared weights) contributes every use, side by side in its stats. Products
  inside ``jax.jit``, ``jax.checkpoint`` and custom-derivative functions are
  found (such a function then runs inline in the statistics pass, without its
  custom rule or rematerialization; the loss and gradient pass runs
  ``apply_fn`` as it is, and a function with no layer inside keeps its rules).
  Products inside ``lax.scan``, ``while_loop`` and ``cond``, between two
  activations (``q @ k.T``) or two parameters, kernels in other layouts
  (``x @ w.T``) and parameters not named ``kernel`` (embeddings) are not
  layers: their parameters take the optimizer's ``fallback``, unless the same
  kernel is also used as a layer, which raises (its stats would miss the other
  use). ``fn.layers(params, inputs, **kwargs)`` returns a report of what is
  matched and why the rest is not; ``print`` it.

  The loss and ``extra`` (``layer_stats``, ``curvature_model``, ``value`` and
  ``value_fn``) are those of :func:`cgfac_optax.flax.value_grad_and_extra`,
  which documents the losses, the Fisher, ``weights``,
  ``curvature_batch_size`` and ``quadratic_batch_size``; ``grads`` is the
  gradient of the loss with respect to ``params``, from one forward and one
  backward pass of ``apply_fn``.

  Args:
    apply_fn: the model, ``apply_fn(params, inputs, **kwargs) -> outputs``,
      ``outputs`` of shape ``(examples, ..., k)``.
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
      ``"squared_error"``.
    fisher: ``"sampled"`` (the true Fisher, as in K-FAC) or ``"empirical"``.
    curvature_batch_size: how many of the batch's first examples feed the
      curvature stats: an int, a fraction of the batch (a float in ``(0,
      1]``), or ``None`` for all.
    quadratic_batch_size: the same for the quadratic model's examples.

  Returns:
    ``fn(params, inputs, targets, rng=None, *, weights=None, **kwargs) ->
    (loss, grads, extra)``, with ``fn.layers(params, inputs, **kwargs)``.
    ``rng`` is required for ``fisher="sampled"``; ``kwargs`` go to
    ``apply_fn`` (Python values among them stay static when ``fn`` is called
    inside a jitted function).

  Raises:
    TypeError: for an ``apply_fn`` that is not callable.
    ValueError: for an unknown loss or Fisher or a bad ``curvature_batch_size``
      (at construction); when called, for targets of the wrong shape or a model
      in which no product is a layer; when called and from ``fn.layers``,
      naming the layer, for a kernel used both in a layer's product and
      otherwise (inside ``lax.scan``, say) or a layer's bias that is not added
      to its product's output.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import cgfac_optax as cgfac
    >>> def mlp(params, x):
    ...   h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    ...   return h @ params["out"]["kernel"]
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {
    ...   "hidden": {"kernel": jax.random.normal(k1, (5, 8)), "bias": jnp.zeros(8)},
    ...   "out": {"kernel": jax.random.normal(k2, (8, 3))},
    ... }
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> fn = cgfac.value_grad_and_extra(mlp, loss="softmax_cross_entropy")
    >>> print(fn.layers(params, x))
    layers (2):
      hidden: dot_general float32[4,5] x float32[5,8] -> float32[4,8]
      out: dot_general float32[4,8] x float32[8,3] -> float32[4,3]
    parameters left to the optimizer's fallback (0):
    products that are not layers (0):
    >>> tx = cgfac.cgfac()
    >>> @jax.jit
    ... def step(params, opt_state, x, y, key):
    ...   loss, grads, extra = fn(params, x, y, key)
    ...   updates, opt_state = tx.update(grads, opt_state, params, **extra)
    ...   return optax.apply_updates(params, updates), opt_state, loss
    >>> params, opt_state, loss = step(params, tx.init(params), x, y, jax.random.key(1))
  """
  _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  _capture.check_batch_sizes(curvature_batch_size, quadratic_batch_size)
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be a function (params, inputs, **kwargs), got {apply_fn!r}")

  def fn(params, inputs, targets, rng=None, *, weights=None, **kwargs):
    value, grads, extra, _ = _capture.value_grad_and_extra(
      _model(apply_fn, kwargs),
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
    return value, grads, extra

  def layers(params, inputs, **kwargs) -> _graph.Report:
    """What is matched in ``apply_fn(params, inputs, **kwargs)``, and why the rest is not."""
    return _trace(apply_fn, kwargs, params, inputs)[2].report

  fn.layers = layers
  return fn
