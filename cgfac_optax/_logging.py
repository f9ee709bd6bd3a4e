"""``state_scalars``: an optimizer state as a flat ``{name: scalar}`` dict, for metric loggers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from cgfac_optax._transform import ScaleByCGFACState

_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_node(x: Any) -> bool:
  return isinstance(x, (ScaleByCGFACState, optax.ApplyIfFiniteState, *_INJECTED))


def _cgfac_scalars(state: ScaleByCGFACState) -> dict[str, jax.Array]:
  out = {
    "count": state.count,
    "damping": state.control.damping,
    "clip": state.control.clip,
  }
  if state.coefficients is not None:
    out["step_size"], out["momentum"] = state.coefficients[0], state.coefficients[1]
  skipped = list(state.control.skipped.values())
  out["skipped"] = sum(skipped) if skipped else jnp.zeros([], jnp.int32)
  out["skipped_steps"] = state.control.skipped_steps
  out["fallback_skipped"] = state.control.fallback_skipped
  for path in sorted(state.iterations):
    suffix = f"/{path}" if path else ""  # path "": the params are one layer
    out["cg_iterations" + suffix] = state.iterations[path]
    out["cg_residual" + suffix] = state.residual[path]
    out["skipped" + suffix] = state.control.skipped[path]
  return out


def _hyperparams(state) -> dict[str, jax.Array]:
  return {
    f"hyperparams/{name}": value
    for name, value in state.hyperparams.items()
    if isinstance(value, (jax.Array, float, int)) and jnp.ndim(value) == 0
  }


def state_scalars(opt_state: Any) -> dict[str, jax.Array]:
  """Every scalar worth logging in an optimizer state, as a flat ``{name: scalar array}`` dict.

  Finds each :class:`ScaleByCGFACState` in ``opt_state`` (wherever ``optax.chain``,
  ``optax.partition``, ``optax.MultiSteps``, ``optax.apply_if_finite`` or
  ``optax.inject_hyperparams`` put it) and reads:

  - ``count``: the updates it has made; ``damping``: the damping (with
    :class:`AdaptiveDamping`, the next solve's); ``clip``: the last KL-clipping
    factor (1: not clipped);
  - ``step_size`` and ``momentum``: the last ``(alpha, mu)`` of the quadratic
    model, when it chooses them (``cgfac()`` without a learning rate);
  - ``skipped``: layer solves skipped for non-finite values, summed over layers,
    and per layer ``skipped/<path>``, ``cg_iterations/<path>`` and
    ``cg_residual/<path>`` (the last solve's iterations and relative residual);
    ``fallback_skipped``: skipped updates of parameters without stats;
    ``skipped_steps``: steps skipped as a whole (a bad traced option, every part
    not finite, or a non-finite step of the quadratic model);

  The numeric hyperparameters that ``optax.inject_hyperparams`` keeps in the
  state appear as ``hyperparams/<name>`` (e.g. ``hyperparams/learning_rate``),
  and ``optax.apply_if_finite``'s counts of dropped steps as
  ``apply_if_finite/notfinite_count`` (in a row) and ``apply_if_finite/total_notfinite``.
  With several CG-FAC states (one per ``optax.partition`` group, say) each name
  is prefixed by ``cgfac<i>/``, in the order of the state's leaves.

  The values are the state's own scalar arrays: it runs inside ``jax.jit``, and
  ``jax.device_get`` or ``float`` makes plain numbers for TensorBoard, CLU's
  ``write_scalars`` or a print.

  Args:
    opt_state: the state of any optax transformation.

  Returns:
    ``{name: scalar array}``; empty when the state holds no CG-FAC state and no
    injected hyperparameters.

  Examples:
    >>> import jax.numpy as jnp
    >>> import cgfac_optax as cgfac
    >>> tx = cgfac.cgfac(learning_rate=0.1)
    >>> scalars = cgfac.state_scalars(tx.init({"out": {"kernel": jnp.zeros((3, 2))}}))
    >>> sorted(scalars)  # doctest: +NORMALIZE_WHITESPACE
    ['cg_iterations/out', 'cg_residual/out', 'clip', 'count', 'damping',
     'fallback_skipped', 'skipped', 'skipped/out', 'skipped_steps']
  """
  cg_states: list[ScaleByCGFACState] = []
  out: dict[str, jax.Array] = {}

  def walk(tree):
    for node in jax.tree.leaves(tree, is_leaf=_is_node):
      if isinstance(node, ScaleByCGFACState):
        cg_states.append(node)
      elif isinstance(node, optax.ApplyIfFiniteState):
        out["apply_if_finite/notfinite_count"] = node.notfinite_count
        out["apply_if_finite/total_notfinite"] = node.total_notfinite
        walk(node.inner_state)
      elif isinstance(node, _INJECTED):
        out.update(_hyperparams(node))
        walk(node.inner_state)

  walk(opt_state)
  for i, state in enumerate(cg_states):
    prefix = f"cgfac{i}/" if len(cg_states) > 1 else ""
    out.update({prefix + k: v for k, v in _cgfac_scalars(state).items()})
  return out
