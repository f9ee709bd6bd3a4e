"""The few facts about traced JAX programs (jaxprs) that the graph capture relies on.

Everything here changes between JAX releases, so it lives in one place: which
primitives call a sub-program once on their operands and under which parameter
it sits (a ``jax.jit`` inside the model is ``pjit`` in older releases and
``jit`` in newer ones; a ``jax.custom_vjp`` function was ``custom_vjp_call_jaxpr``
holding ``fun_jaxpr``), how to bind an equation again (``get_bind_params``
returned ``(subfuns, params)``, now the params alone), and one loop that walks
a jaxpr with any step function, so that the matcher's analysis and the
capture's interpreter read the program the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core

PRODUCTS = ("dot_general", "conv_general_dilated")

# Primitives that run one sub-jaxpr once on their operands, and the parameter that holds it.
CALLS = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "remat2": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
}

Step = Callable[[Any, list, tuple[int, ...]], Sequence]


def trace(fn: Callable, *args) -> tuple[core.ClosedJaxpr, Any]:
  """The jaxpr of ``fn(*args)`` and the shapes of its outputs."""
  return jax.make_jaxpr(fn, return_shape=True)(*args)


def called(eqn) -> tuple[Any, list] | None:
  """``(jaxpr, consts)`` of the sub-program a call equation runs on its operands, else None."""
  name = CALLS.get(eqn.primitive.name)
  sub = None if name is None else eqn.params.get(name)
  if sub is None:
    return None
  if isinstance(sub, core.ClosedJaxpr):
    return sub.jaxpr, list(sub.consts)
  return sub, []


def nested(eqn) -> bool:
  """Whether ``eqn`` runs sub-programs that are not one plain call (loops, branches, maps)."""

  def program(v):
    return isinstance(v, (core.ClosedJaxpr, core.Jaxpr))

  return any(
    program(v) or (isinstance(v, (tuple, list)) and any(map(program, v)))
    for v in eqn.params.values()
  )


def bind(eqn, invals: Sequence) -> list:
  """Runs one equation on ``invals``, as ``jax.core.eval_jaxpr`` does: its outputs, as a list."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns, params = params if isinstance(params, tuple) else ((), params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def walk(jaxpr, consts: Sequence, args: Sequence, step: Step, loc: tuple[int, ...] = ()) -> list:
  """Evaluates ``jaxpr`` with ``step(eqn, invals, loc) -> outvals`` for every equation.

  ``loc`` names an equation by its index in each enclosing jaxpr, so two walks of
  the same program (the matcher's and the capture's) agree on which is which; a
  step that enters a call walks its sub-jaxpr with the call's ``loc`` as prefix.
  """
  env: dict = {}

  def read(atom):
    return atom.val if isinstance(atom, core.Literal) else env[atom]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for i, eqn in enumerate(jaxpr.eqns):
    outs = step(eqn, [read(v) for v in eqn.invars], (*loc, i))
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]
