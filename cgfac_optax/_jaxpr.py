"""The few facts about traced JAX programs (jaxprs) that the graph capture relies on.

Everything here changes between JAX releases, so it lives in one place: which
primitives call a sub-program once on their operands and under which parameter
it sits (a ``jax.jit`` inside the model is ``pjit`` in older releases and
``jit`` in newer ones; a ``jax.custom_vjp`` function was ``custom_vjp_call_jaxpr``
holding ``fun_jaxpr``), how to bind an equation again (``get_bind_params``
returned ``(subfuns, params)``, now the params alone), and one loop that walks
a jaxpr with any step function, so that the matcher's analysis and the
capture's interpreter read the program the same way. The same walk reruns a
program with its convolutions in XLA:CPU's fast layout
(:func:`channels_last_convolutions`).
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


# The calls that are plain function calls (no custom differentiation rule): safe to inline.
_PLAIN_CALLS = tuple(name for name in CALLS if not name.startswith("custom_"))


def channels_last_convolutions(fn: Callable) -> Callable:
  """``fn`` with every convolution it runs given the layout XLA's CPU backend runs fast.

  Reverse-mode differentiation writes a convolution's input and kernel gradients as
  convolutions with the features and the examples, or the kernel's input and output
  features, swapped. XLA:CPU rewrites such convolutions to the batch-first,
  channels-last layout with an ``HWIO`` kernel before running them, but only in the
  program's top level: inside a ``lax.cond`` branch or a loop body they run as written,
  7 to 16 times slower. The returned function evaluates ``fn``'s program with each
  convolution's operands transposed to that layout and its result transposed back
  (the same numbers; transposes are cheap beside the product). Plain calls are inlined
  so that the convolutions inside them are rewritten too; a call with a custom
  differentiation rule runs as it is.
  """

  def step(eqn, invals, loc):
    sub = called(eqn) if eqn.primitive.name in _PLAIN_CALLS else None
    if sub is not None:
      return walk(sub[0], sub[1], invals, step, loc)
    if eqn.primitive.name == "conv_general_dilated":
      return [_channels_last_convolution(eqn, *invals)]
    return bind(eqn, invals)

  def run(*args):
    closed, shapes = trace(fn, *args)
    outs = walk(closed.jaxpr, closed.consts, jax.tree.leaves(args), step)
    return jax.tree.unflatten(jax.tree.structure(shapes), outs)

  return run


def _channels_last_convolution(eqn, lhs, rhs):
  """One ``conv_general_dilated`` equation run with ``(N, spatial..., C)`` input and output
  and a ``(spatial..., in, out)`` kernel."""
  dn = eqn.params["dimension_numbers"]
  n = len(dn.lhs_spec) - 2
  lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
  rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
  spatial = tuple(range(1, n + 1))
  canonical = jax.lax.ConvDimensionNumbers(
    lhs_spec=(0, n + 1, *spatial), rhs_spec=(n + 1, n, *range(n)), out_spec=(0, n + 1, *spatial)
  )
  identity = tuple(range(n + 2))
  if lhs_perm == rhs_perm == identity and tuple(dn.out_spec) == canonical.out_spec:
    return bind(eqn, [lhs, rhs])[0]
  params = dict(eqn.params, dimension_numbers=canonical)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(
      jax.numpy.transpose(lhs, lhs_perm), jax.numpy.transpose(rhs, rhs_perm), **params
    )
  # The result's axes are (batch, spatial..., feature); out_spec says where each one goes.
  source = {dn.out_spec[0]: 0, dn.out_spec[1]: n + 1}
  source.update({dn.out_spec[2 + k]: 1 + k for k in range(n)})
  return jax.numpy.transpose(out, [source[axis] for axis in range(n + 2)])
