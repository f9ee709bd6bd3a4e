"""Linen: the loss, the gradients and everything ``update`` reads, for an unchanged ``nn.Module``.

Every call of a captured layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Conv``,
and any class added with :func:`~cgfac_optax.flax.register_rule`) is
intercepted with ``nn.intercept_methods``: its input is sown into the
``"cgfac_inputs"`` collection and a zero perturbation (``Module.perturb``,
collection ``"cgfac_perturbations"``) is added to its output, whose gradient is
the output gradient. Going through Linen collections keeps this correct inside
``nn.remat`` and ``nn.jit``; inside ``nn.scan`` and ``nn.vmap`` the capture
raises an error naming the layer rather than return incomplete stats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import optax
from flax import traverse_util
from flax.training import train_state

from cgfac_optax import _capture, _layers, _losses
from cgfac_optax._capture import DEFAULT_CURVATURE_BATCH_SIZE, DEFAULT_QUADRATIC_BATCH_SIZE
from cgfac_optax.flax._rules import apply_rule, find_rule, no_layers_message

INPUTS = "cgfac_inputs"
PERTURBATIONS = "cgfac_perturbations"


def _interceptor(recorder: _capture.Recorder):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    rule = find_rule(module) if context.method_name == "__call__" else None
    if rule is None:
      return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    if not module.is_mutable_collection(INPUTS):
      raise ValueError(
        f"layer {_layers.path_str(path)!r} ({type(module).__name__}) is called inside a Flax "
        f"lifted transformation (nn.scan, nn.vmap, ...) that does not pass the {INPUTS!r} "
        "collection through, so its curvature stats cannot be captured; call the layer "
        "outside the transformation (nn.remat and nn.jit are supported)"
      )
    x = args[0] if args else kwargs["inputs"]
    a = apply_rule(rule.inputs, module, x, path)
    y = next_fun(*args, **kwargs)
    index = recorder.next_index(path)
    module.sow(INPUTS, "inputs", a)
    y = module.perturb(f"cgfac_out{index}", y, collection=PERTURBATIONS)
    recorder.add(path, a, y, lambda dy: rule.output_grads(module, dy))
    return y

  return intercept


def _mutable_names(collections: Mapping, mutable) -> list[str]:
  """The collections the model may change: ``mutable`` as Linen takes it, by name."""
  if mutable is None or mutable is True:
    return list(collections)
  if mutable is False:
    return []
  names = [mutable] if isinstance(mutable, str) else list(mutable)
  if not all(isinstance(n, str) for n in names):
    raise ValueError(
      f"mutable must be a bool, a collection name or a list of them, got {mutable!r}"
    )
  return names


def _model(module: nn.Module, collections: Mapping, mutable: Sequence[str], apply_kwargs):
  """The engine's :class:`~cgfac_optax._capture.Model` of a Linen module."""

  def apply(variables, inputs, extra_mutable=()):
    out, changed = module.apply(
      variables, inputs, mutable=[*mutable, *extra_mutable], **apply_kwargs
    )
    return out, changed

  def run(params, inputs):
    out, changed = apply({"params": params, **collections}, inputs)
    return out, {k: v for k, v in changed.items() if k in mutable}

  def capture(params, inputs, perturbations, recorder):
    variables = {"params": params, **collections}
    if perturbations is not None:
      variables[PERTURBATIONS] = traverse_util.unflatten_dict(
        {
          recorder.planned[key].path + (f"cgfac_out{recorder.planned[key].index}",): value
          for key, value in perturbations.items()
        }
      )
    with nn.intercept_methods(_interceptor(recorder)):
      out, changed = apply(variables, inputs, (INPUTS,))
    layer_inputs = {}
    for name, sown in traverse_util.flatten_dict(changed.get(INPUTS, {})).items():
      for index, a in enumerate(sown):
        layer_inputs[_capture.use_key(name[:-1], index)] = a
    return out, layer_inputs, None

  return _capture.Model(run, capture, no_layers_message())


def value_grad_and_extra(
  model: nn.Module,
  *,
  loss: str = "softmax_cross_entropy",
  fisher: str = "sampled",
  curvature_batch_size: int | float | None = DEFAULT_CURVATURE_BATCH_SIZE,
  quadratic_batch_size: int | float | None = DEFAULT_QUADRATIC_BATCH_SIZE,
) -> Callable[..., tuple[jax.Array, Any, dict]]:
  r"""The loss, the gradients and ``extra``, everything ``tx.update`` reads, of a Linen model.

  ``fn = value_grad_and_extra(model, loss=...)`` returns ``fn(params, inputs,
  targets, rng, ...) -> (loss, grads, extra)``, jit-able, for::

    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    state = state.apply_gradients(grads=grads, **extra)  # cgfac_optax.flax.TrainState

  ``loss`` is the batch mean of the per-example losses and ``grads`` its
  gradient with respect to ``params``, from one forward and one backward pass
  of the unchanged model (what a first-order optimizer computes). ``extra``
  holds:

  - ``layer_stats``: a function that computes the curvature stats of the
    batch's first ``curvature_batch_size`` examples (one more forward pass of
    those examples and one backward pass to the layer outputs, with targets
    drawn from the model for ``fisher="sampled"``, the batch's own for
    ``"empirical"``); the optimizer calls it only on the steps that update its
    curvature;
  - ``curvature_model``: the model's outputs on the batch's first
    ``quadratic_batch_size`` examples as a function of the parameters (exact
    Fisher products for the step sizes, on every step);
  - ``value`` and ``value_fn``: the loss, and the loss of this batch at other
    parameters (adaptive damping);
  - ``collections``: with ``collections=``, the model's variable collections
    after the loss pass (e.g. BatchNorm's updated ``batch_stats``), which
    ``TrainState.apply_gradients`` stores and ``tx.update`` ignores.

  The extra passes run the model as the loss pass did (same call arguments,
  ``rngs`` included, so dropout draws the same masks where the examples are
  the same; BatchNorm in training mode normalizes with the statistics of the
  examples it sees), and drop whatever they change in the collections.

  Per-example losses (the last output axis is the prediction; axes between the
  first and the last are positions, averaged):

  - ``"softmax_cross_entropy"``: integer labels of shape ``outputs.shape[:-1]``.
  - ``"sigmoid_binary_cross_entropy"``: targets in ``[0, 1]``, summed over the
    last axis.
  - ``"squared_error"``: ``0.5 * sum_k (y_k - t_k)^2``, the unit Gaussian.

  Weights: with ``weights=w`` (shape ``(examples,)``, ``>= 0``, positive sum)
  the loss is ``sum_j w_j l_j / sum_j w_j``; ``G`` is then the weighted mean of
  the examples' output-gradient products (a 0/1 mask drops examples from the
  loss, the gradients and ``G``; ``A`` still averages every example's inputs).

  Args:
    model: the Linen module (unbound).
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
      ``"squared_error"``.
    fisher: ``"sampled"`` (the true Fisher, as in K-FAC) or ``"empirical"``.
    curvature_batch_size: how many of the batch's first examples feed the
      curvature stats: an int (a batch smaller than it uses all its
      examples), a float in ``(0, 1]`` (that fraction of the batch, as
      scikit-learn's ``test_size``), or ``None`` for all.
    quadratic_batch_size: the same for the quadratic model's examples. Its
      two Jacobian-vector products run on every step (the stats only on the
      steps that read them), so this sets most of what a step costs beyond
      the loss pass; the default, a quarter of the batch, keeps that share
      fixed. On a mesh with Explicit axes it is rounded up to whole shards of
      the batch axis.

  Returns:
    ``fn(params, inputs, targets, rng=None, *, collections=None, mutable=None,
    weights=None, **apply_kwargs) -> (loss, grads, extra)``. ``params`` is
    ``variables["params"]``; ``collections`` the other variable collections
    (``{"batch_stats": ...}``), mutable in every pass unless ``mutable`` (as
    in ``model.apply``) names fewer; ``apply_kwargs`` go to ``model.apply``
    (``train=True``, ``rngs={"dropout": key}``). ``inputs`` is the first
    argument of ``model.apply`` after the variables (a pytree of arrays whose
    leading axis is the examples); ``rng`` is required for
    ``fisher="sampled"``.

  Raises:
    ValueError: for an unknown loss or Fisher or a bad ``curvature_batch_size``
      (at construction); for targets of the wrong shape, a layer called inside
      ``nn.scan``/``nn.vmap``, or a model without a captured layer (when called).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import cgfac_optax as cgfac
    >>> from cgfac_optax import flax as cflax
    >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = cgfac.cgfac()
    >>> opt_state = tx.init(params)
    >>> fn = cflax.value_grad_and_extra(model, loss="softmax_cross_entropy")
    >>> loss, grads, extra = fn(params, x, y, jax.random.key(1))
    >>> updates, opt_state = tx.update(grads, opt_state, params, **extra)
  """
  _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  _capture.check_batch_sizes(curvature_batch_size, quadratic_batch_size)

  def fn(
    params, inputs, targets, rng=None, *, collections=None, mutable=None, weights=None, **kwargs
  ):
    if "mutable" in kwargs or "variables" in kwargs:
      raise TypeError("pass the non-parameter collections as collections=, not variables=")
    collections = dict(collections or {})
    names = _mutable_names(collections, mutable)
    value, grads, extra, changed = _capture.value_grad_and_extra(
      _model(model, collections, names, kwargs),
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
    if collections:
      extra["collections"] = {**collections, **changed}
    return value, grads, extra

  return fn


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` with the model's other collections, for ``apply_gradients(**extra)``.

  ``collections`` holds the variable collections besides ``params`` (e.g.
  ``{"batch_stats": ...}``); :meth:`apply_gradients` passes the optimizer's
  extra arguments on to ``tx.update`` (``TrainState.apply_gradients`` drops
  them) and stores the ``collections`` that
  :func:`~cgfac_optax.flax.value_grad_and_extra` returns in ``extra``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import cgfac_optax as cgfac
    >>> from cgfac_optax import flax as cflax
    >>> model = nn.Sequential([nn.Dense(8), nn.BatchNorm(use_running_average=False), nn.Dense(3)])
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> variables = model.init(jax.random.key(0), x)
    >>> state = cflax.TrainState.create(apply_fn=model.apply, variables=variables, tx=cgfac.cgfac())
    >>> fn = cflax.value_grad_and_extra(model)
    >>> key = jax.random.key(1)
    >>> loss, grads, extra = fn(state.params, x, y, key, collections=state.collections)
    >>> state = state.apply_gradients(grads=grads, **extra)
    >>> sorted(state.collections)
    ['batch_stats']
  """

  collections: Any = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, *, apply_fn, tx, params=None, variables=None, **kwargs) -> TrainState:
    """From ``params`` (and ``collections=``), or from a whole ``variables`` dict."""
    if (params is None) == (variables is None):
      raise TypeError("TrainState.create takes params= or variables=, exactly one of them")
    if variables is not None:
      variables = dict(variables)
      params = variables.pop("params")
      kwargs["collections"] = {**variables, **kwargs.get("collections", {})}
    return super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)

  def apply_gradients(self, *, grads, collections=None, **extra_args) -> TrainState:
    """One optimizer step: ``tx.update(grads, opt_state, params, **extra_args)``.

    Args:
      grads: gradients like ``params``.
      collections: the model's collections after the step's forward pass
        (kept as they are when ``None``).
      **extra_args: the keyword arguments of ``tx.update`` (``**extra``).

    Returns:
      The state with ``step + 1`` and the new ``params``, ``opt_state`` and
      ``collections``.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      collections=self.collections if collections is None else collections,
    )
