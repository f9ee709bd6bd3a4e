"""Linen: loss, gradients and CG-FAC layer stats of an unchanged ``nn.Module``.

Every call of a captured layer (``nn.Dense``, ``nn.DenseGeneral``, and any
class added with :func:`~cgfac_optax.flax.register_rule`) is intercepted with
``nn.intercept_methods``: its input is sown into the ``"cgfac_inputs"``
collection and a zero perturbation (``Module.perturb``, collection
``"cgfac_perturbations"``) is added to its output, whose gradient is the
output gradient. Going through Linen collections keeps this correct inside
``nn.remat`` and ``nn.jit``; inside ``nn.scan`` and ``nn.vmap`` the capture
raises an error naming the layer rather than return incomplete stats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from flax import traverse_util
from flax.training import train_state

from cgfac_optax import _layers, _losses
from cgfac_optax._quadratic import CurvatureModel
from cgfac_optax.flax import _capture
from cgfac_optax.flax._rules import find_rule

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
    a = _capture.apply_rule(rule.inputs, module, x, path)
    y = next_fun(*args, **kwargs)
    index = recorder.next_index(path)
    module.sow(INPUTS, "inputs", a)
    y = module.perturb(f"cgfac_out{index}", y, collection=PERTURBATIONS)
    recorder.add(path, module, rule, a, y)
    return y

  return intercept


def value_grad_and_stats(
  model: nn.Module,
  *,
  loss: str = "softmax_cross_entropy",
  fisher: str = "sampled",
  curvature_rows: int | None = None,
) -> Callable[..., tuple[jax.Array, Any, dict]]:
  r"""Loss, gradients and CG-FAC ``layer_stats`` of a Linen model in one pass.

  The returned function runs one forward pass and one backward pass
  (``fisher="empirical"``), or one forward and two backward passes through the
  same vjp (``fisher="sampled"``, the default, as in K-FAC: output gradients
  from targets drawn from the model's predictive distribution), or, with
  ``curvature_rows``, a second forward and backward pass on a subsample (see
  below). The model is not changed: dense layers are found with
  ``nn.intercept_methods``.

  The returned loss is the batch mean of the per-example losses (see below)
  and ``grads`` its gradient with respect to ``params``. ``stats`` mirrors
  ``params`` down to each captured layer's parameter dict, where it holds a
  :class:`~cgfac_optax.DenseStats` whose ``output_grads`` are the gradients of
  the *per-example* loss (``B`` times those of the mean). A layer called
  several times contributes the positions of all its calls, side by side.

  Per-example losses (the last output axis is the prediction; axes between the
  first and the last are positions, averaged):

  - ``"softmax_cross_entropy"``: integer labels of shape ``outputs.shape[:-1]``.
  - ``"sigmoid_binary_cross_entropy"``: targets in ``[0, 1]``, summed over the
    last axis.
  - ``"squared_error"``: ``0.5 * sum_k (y_k - t_k)^2``, the unit Gaussian.

  Weights: with ``weights=w`` (shape ``(examples,)``, ``>= 0``, positive sum)
  the loss is ``sum_j w_j l_j / sum_j w_j`` and ``grads`` its gradient. A
  0/1 mask drops the masked examples from the loss, the gradient and ``G``
  (their output gradients are zero); ``G`` is the weighted mean
  ``sum_j w_j g_j g_j^T / sum_j w_j`` because each example's stats output
  gradient is ``sqrt(B w_j / sum w)`` times its own loss gradient. ``A`` still
  averages the inputs of every example, masked ones included: where masked
  examples are padding, their inputs enter ``A``.

  Curvature rows: the optimizer builds its factors from the stats of the
  batch's first ``curvature_batch_size`` examples only (``cgfac()`` uses 512),
  and with ``curvature_rows=k`` the stats hold those ``k`` examples alone. With
  the sampled Fisher the function then runs one forward and one backward pass
  of the whole batch (the loss and ``grads``, unchanged) and one forward and
  one backward pass of the first ``k`` examples (the stats), instead of a
  second backward pass over the whole batch: a saving when ``k`` is well below
  the batch size (128 of 512: a quarter of a backward pass plus a quarter of a
  forward pass instead of a whole backward pass). The stats are exactly those
  of this function (without ``curvature_rows``) on the batch's first ``k``
  examples alone: the inputs sliced along their leading axis, ``targets[:k]``,
  ``weights[:k]`` and the same ``rng``. Unweighted, each row is the example's
  own loss gradient, as in the whole batch's stats; weighted, ``G`` is the
  weighted mean over those ``k`` examples (output gradients ``sqrt(k w_j /
  sum_{i<k} w_i)`` times the example's own, zero when the ``k`` weights sum to
  zero). The targets are drawn for the ``k`` examples, so they are not the
  first ``k`` of a whole-batch draw with the same ``rng``; stochastic layers
  (dropout) draw their own masks in that pass, and layers that mix examples
  see only those ``k``. With the empirical Fisher the one backward pass has
  every example's gradient already: the stats are its first ``k`` rows, scaled
  the same way, at no extra cost. ``k`` equal to the batch size is the same as
  ``None``. The quadratic model (:func:`curvature_model`) is separate and
  stays on the whole batch.

  Args:
    model: the Linen module (unbound).
    loss: ``"softmax_cross_entropy"``, ``"sigmoid_binary_cross_entropy"`` or
      ``"squared_error"``.
    fisher: ``"sampled"`` (true Fisher, default) or ``"empirical"``.
    curvature_rows: ``None`` (stats of the whole batch, default) or ``k``, an
      int from 1 to the batch size: stats of the batch's first ``k`` examples
      only (see above); set it to the optimizer's ``curvature_batch_size``.

  Returns:
    ``vgs(params, inputs, targets, rng=None, *, weights=None, **apply_kwargs)
    -> (loss, grads, stats)``, jit-able. ``params`` is ``variables["params"]``;
    ``apply_kwargs`` go to ``model.apply`` (e.g. ``rngs=``, ``train=``; not
    ``mutable``). ``rng`` is required for ``fisher="sampled"``.

  Raises:
    ValueError: for an unknown loss or Fisher, or ``curvature_rows`` that is
      not a positive int (at construction); for targets of the wrong shape, a
      layer called inside ``nn.scan``/``nn.vmap``, a model without a captured
      layer, or ``curvature_rows`` larger than the batch size (when called).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from cgfac_optax import flax as cflax
    >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> vgs = cflax.value_grad_and_stats(model, loss="softmax_cross_entropy")
    >>> loss, grads, stats = jax.jit(vgs)(params, x, y, jax.random.key(1))
    >>> stats["layers_2"].output_grads.shape
    (4, 3)
  """
  _losses.get_loss(loss)
  _losses.check_fisher(fisher)
  _capture.check_rows(curvature_rows)

  def vgs(params, inputs, targets, rng=None, *, weights=None, **apply_kwargs):
    if "mutable" in apply_kwargs:
      raise ValueError(
        "value_grad_and_stats does not support mutable collections (e.g. batch_stats); got "
        f"mutable={apply_kwargs['mutable']!r}"
      )

    def forward_of(batch):
      def forward(p, perturbations, recorder):
        variables = {"params": p}
        if perturbations is not None:
          variables[PERTURBATIONS] = traverse_util.unflatten_dict(
            {
              recorder.planned[key].path + (f"cgfac_out{recorder.planned[key].index}",): value
              for key, value in perturbations.items()
            }
          )
        with nn.intercept_methods(_interceptor(recorder)):
          outputs, collections = model.apply(variables, batch, mutable=[INPUTS], **apply_kwargs)
        inputs_by_key = {}
        for name, sown in traverse_util.flatten_dict(collections.get(INPUTS, {})).items():
          for index, a in enumerate(sown):
            inputs_by_key[_capture.use_key(name[:-1], index)] = a
        return outputs, inputs_by_key, None

      return forward

    value, grads, stats, _ = _capture.run(
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
    return value, grads, stats

  return vgs


def apply_gradients(
  state: train_state.TrainState, grads: Any, **extra_args
) -> train_state.TrainState:
  """``state.apply_gradients(grads=grads)`` that forwards ``extra_args`` to ``tx.update``.

  ``TrainState.apply_gradients`` calls ``tx.update(grads, opt_state, params)``
  and cannot pass ``layer_stats``; this does the same step with them.

  Args:
    state: a ``flax.training.train_state.TrainState`` (or subclass).
    grads: gradients like ``state.params``.
    **extra_args: keyword arguments of ``tx.update``, e.g. ``layer_stats=stats``.

  Returns:
    ``state`` with ``step + 1``, updated ``params`` and ``opt_state``.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> import cgfac_optax as cgfac
    >>> from cgfac_optax import flax as cflax
    >>> from flax.training import train_state
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    >>> state = train_state.TrainState.create(
    ...   apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
    ...   tx=cgfac.cgfac(learning_rate=0.1, damping=1e-2))
    >>> vgs = cflax.value_grad_and_stats(model)
    >>> loss, grads, stats = vgs(state.params, x, y, jax.random.key(1))
    >>> state = cflax.apply_gradients(state, grads, layer_stats=stats)
    >>> int(state.step)
    1
  """
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra_args)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def curvature_model(
  model: nn.Module, inputs: Any, *, loss: str, rows: int | None = None, **apply_kwargs
) -> CurvatureModel:
  """The :class:`~cgfac_optax.CurvatureModel` of a Linen model on a batch's first ``rows`` examples.

  What ``update`` needs for step sizes from the quadratic model
  (``cgfac_optax.cgfac(learning_rate=None)``): the model's outputs as a function
  of ``params`` alone. Leave ``rows`` unset (the whole batch) unless the batch is
  too large for two extra forward passes: the step sizes and the damping are read
  off this model, and a model on a small subsample is noisy (on the Fashion-MNIST
  autoencoder, 128 of 512 examples made the loss spike late in training; the
  whole batch did not). The factors can still use a subsample
  (``curvature_batch_size``).

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from cgfac_optax import flax as cflax
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((8, 5))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> cm = cflax.curvature_model(model, x, loss="softmax_cross_entropy", rows=4)
    >>> cm.outputs_fn(params).shape
    (4, 3)
  """
  subset = inputs if rows is None else jax.tree.map(lambda x: x[:rows], inputs)
  return CurvatureModel(lambda p: model.apply({"params": p}, subset, **apply_kwargs), loss)
