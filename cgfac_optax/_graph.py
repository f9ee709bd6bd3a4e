"""Which products of a traced model are layers: the matcher of the graph capture.

A *layer* is a parameter dict holding a ``kernel`` (and maybe a ``bias``), as
for the optimizer (:mod:`cgfac_optax._layers`). In the jaxpr of
``apply_fn(params, inputs)``, a product is one call of a layer when

- it is a ``dot_general`` without batch dimensions, or an ungrouped
  ``conv_general_dilated``;
- its second operand is a parameter leaf named ``kernel`` (directly, or through
  reshapes and dtype casts) and its first an *activation*, a value computed from
  the inputs, whose first axis is the examples axis (the output's first axis
  then is too; the inputs' leading axis says how many examples there are);
- the kernel is laid out as the optimizer's matrix ``kernel.reshape(d_in,
  d_out)`` needs: a ``dot_general`` contracts the kernel's leading axes (and
  any of the activation's but its first); a convolution's kernel is
  spatial-leading with ``(c_in, c_out)`` trailing (``HWIO``, as Flax's), its
  input and output batch-first, its output channels-last.

Its rows: ``a`` is the activation with its contracted axes moved last in the
kernel's order and flattened (for a convolution, the patches of
:func:`~cgfac_optax.conv_patches` with the product's strides, padding and
dilations), ``g`` the gradient at the product's output with the kernel's output
axes flattened.

A kernel is a layer when every use of it is such a product (each use of a
layer applied twice, or of shared weights, is captured); a kernel used only in
other ways takes the optimizer's fallback; one used both ways raises, since its
stats would miss the other uses. A layer's ``bias`` must be added to the output
of each of its products (reshapes, broadcasts and casts in between are fine),
or the matcher raises, since the optimizer preconditions it as that layer's
bias. The matcher enters ``jax.jit``, ``closed_call``, ``jax.checkpoint`` and
custom-derivative functions; products inside loops and branches (``scan``,
``while``, ``cond``) are not layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cgfac_optax import _jaxpr
from cgfac_optax._conv import conv_patches
from cgfac_optax._layers import key_name, output_axes

# What a kernel may go through on its way to a product, and a bias on its way to an add
# (broadcasts make it a bias, not a kernel); what a product's output may go through before the
# bias is added to it.
_KERNEL_CHAIN = frozenset({"reshape", "convert_element_type"})
_BIAS_CHAIN = frozenset({"broadcast_in_dim", "squeeze"})
_OUTPUT_CHAIN = frozenset({"reshape", "transpose", "convert_element_type"})


class Match(NamedTuple):
  """How to capture one matched product (static)."""

  path: tuple[str, ...]  # the layer: the path of its parameter dict
  inputs: Callable[[jax.Array], jax.Array]  # the activation -> a, (examples, ..., d_in)
  output_grads: Callable[[jax.Array], jax.Array]  # gradient at the output -> g


class Report(NamedTuple):
  """What the graph capture matches in a model, and why the rest is not a layer.

  ``print(report)`` lists the three parts.

  Attributes:
    layers: each layer's path -> one line per product it is used in.
    fallback: each parameter without stats (its path) -> why; the optimizer's
      ``fallback`` updates these.
    products: the products that are not layers, each with why.
  """

  layers: dict[str, tuple[str, ...]]
  fallback: dict[str, str]
  products: tuple[str, ...]

  def __str__(self) -> str:
    lines = [f"layers ({len(self.layers)}):"]
    lines += [f"  {path}: {use}" for path, uses in self.layers.items() for use in uses]
    lines.append(f"parameters left to the optimizer's fallback ({len(self.fallback)}):")
    lines += [f"  {path}: {why}" for path, why in self.fallback.items()]
    lines.append(f"products that are not layers ({len(self.products)}):")
    lines += [f"  {line}" for line in self.products]
    return "\n".join(lines)


class Analysis(NamedTuple):
  """The matcher's result for one traced model."""

  matches: dict[tuple[int, ...], Match]  # by the product's location (see ``_jaxpr.walk``)
  inline: frozenset[tuple[int, ...]]  # the calls with a matched product inside
  report: Report


class _Val(NamedTuple):
  """What the matcher knows of a value."""

  leaf: int | None = None  # it is this parameter leaf, reshaped or cast
  spread: bool = False  # ... and broadcast (a bias may be, a kernel may not)
  data: bool = False  # it depends on the model's inputs
  product: int | None = None  # it is this candidate product's output, maybe reshaped


class _Use(NamedTuple):
  kind: str  # "product" (its kernel), "bias" (added to its output) or "other"
  product: int | None
  what: str


class _Candidate(NamedTuple):
  loc: tuple[int, ...]
  match: Match
  what: str
  d_out: int


def _rows(x: jax.Array, *, perm: tuple[int, ...], lead: int) -> jax.Array:
  x = jnp.transpose(x, perm)
  return x.reshape(*x.shape[:lead], -1)


def _flatten(y: jax.Array, *, lead: int) -> jax.Array:
  return y.reshape(*y.shape[:lead], -1)


def _identity(y: jax.Array) -> jax.Array:
  return y


def _not_examples(size: int, examples: int) -> str:
  return f"the activation's leading axis has {size} entries, not the {examples} examples"


def _dense(params, x: tuple, k: tuple, leaf: tuple, examples: int):
  """``(inputs, output_grads, d_out)`` of a ``dot_general`` that is a layer, or why not."""
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  n = len(rc)
  if lb or rb:
    return "it has batch dimensions"
  if not rc or sorted(rc) != list(range(n)):
    return f"it contracts the kernel's axes {tuple(rc)}, not its leading axes"
  if n == len(k):
    return "the kernel has no output axis"
  if 0 in lc:
    return "it contracts the activation's first (examples) axis"
  if x[0] != examples:
    return _not_examples(x[0], examples)
  d_in, d_out = math.prod(k[:n]), math.prod(k[n:])
  if output_axes(leaf, d_in, d_out) is None:
    return f"the kernel, of shape {leaf}, is reshaped to {k} across its input/output split"
  free = tuple(d for d in range(len(x)) if d not in lc)
  order = tuple(lc[list(rc).index(i)] for i in range(n))
  lead = len(free)
  return partial(_rows, perm=free + order, lead=lead), partial(_flatten, lead=lead), d_out


def _conv(params, x: tuple, k: tuple, leaf: tuple, examples: int):
  """``(inputs, output_grads, d_out)`` of a ``conv_general_dilated`` that is a layer, or why not."""
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return "it is a grouped convolution (no single Kronecker block)"
  dn, n = params["dimension_numbers"], len(k)
  if tuple(dn.rhs_spec) != (n - 1, n - 2, *range(n - 2)):
    return "its kernel is not spatial-leading with (c_in, c_out) trailing (HWIO)"
  if dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0 or dn.out_spec[1] != n - 1:
    return "its input or output is not batch-first, or its output not channels-last"
  if x[0] != examples:
    return _not_examples(x[0], examples)
  if output_axes(leaf, math.prod(k[:-1]), k[-1]) is None:
    return f"the kernel, of shape {leaf}, is reshaped to {k} across its input/output split"
  inputs = partial(
    conv_patches,
    kernel_shape=k,
    window_strides=params["window_strides"],
    padding=params["padding"],
    lhs_dilation=params["lhs_dilation"],
    rhs_dilation=params["rhs_dilation"],
    dimension_numbers=dn,
  )
  return inputs, _identity, k[-1]


def _operands(x: _Val, k: _Val, names: list[tuple[str, ...]]) -> str | None:
  """Why a product's operands are not an activation and a kernel, or None."""
  if x.leaf is not None and k.leaf is not None:
    return "both operands are parameters"
  if k.leaf is None:
    if x.leaf is not None:
      return (
        f"the parameter {'/'.join(names[x.leaf])!r} is the first operand (a layer's kernel is "
        "the second, so that the examples axis leads the output)"
      )
    return "both operands are activations" if x.data and k.data else "no operand is a parameter"
  path = "/".join(names[k.leaf])
  if not x.data:
    return f"its other operand than {path!r} does not depend on the inputs"
  if names[k.leaf][-1] != "kernel":
    return f"the parameter {path!r} is not named 'kernel'"
  if k.spread:
    return f"the parameter {path!r} is broadcast"
  return None


def _describe(eqn) -> str:
  short = lambda v: f"{v.aval.dtype.name}[{','.join(map(str, v.aval.shape))}]"
  x, k = (short(v) for v in eqn.invars[:2])
  return f"{eqn.primitive.name} {x} x {k} -> {short(eqn.outvars[0])}"


class _Matcher:
  """One walk of a model's jaxpr: its candidate products and every use of each parameter."""

  def __init__(self, names: list[tuple[str, ...]], shapes: list[tuple], examples: int):
    self.names = names  # of each parameter leaf: its path
    self.shapes = shapes
    self.examples = examples
    self.candidates: list[_Candidate] = []
    self.uses: dict[int, list[_Use]] = {}
    self.skipped: list[str] = []
    self.calls: list[str] = []  # the calls the walk is inside, innermost last

  def step(self, eqn, ins: list, loc: tuple[int, ...]) -> list[_Val]:
    ins = [x if isinstance(x, _Val) else _Val() for x in ins]
    name = eqn.primitive.name
    sub = _jaxpr.called(eqn)
    if sub is not None:
      return self._call(eqn, sub, ins, loc)
    if name in _jaxpr.PRODUCTS:
      return [self._product(eqn, ins, loc)]
    # (A reshape with ``dimensions`` transposes first.)
    plain = name != "reshape" or eqn.params.get("dimensions") is None
    if plain and ins and ins[0].leaf is not None and name in _KERNEL_CHAIN | _BIAS_CHAIN:
      return [ins[0]._replace(spread=ins[0].spread or name in _BIAS_CHAIN)]
    if plain and ins and ins[0].product is not None and name in _OUTPUT_CHAIN:
      return [ins[0]]
    if name == "add" and self._bias(ins):
      return [_Val(data=True)]
    what = f"used by {name}"
    if _jaxpr.nested(eqn):
      what += f" (products inside {name} are not matched)"
    for x in ins:
      if x.leaf is not None:
        self._use(x.leaf, "other", None, self._where(what))
    return [_Val(data=any(x.data for x in ins)) for _ in eqn.outvars]

  def _where(self, what: str) -> str:
    return f"{what} in {' > '.join(self.calls)}" if self.calls else what

  def _use(self, leaf: int, kind: str, product: int | None, what: str) -> None:
    self.uses.setdefault(leaf, []).append(_Use(kind, product, what))

  def _call(self, eqn, sub, ins: list[_Val], loc: tuple[int, ...]) -> list[_Val]:
    jaxpr, consts = sub
    self.calls.append(f"{eqn.primitive.name}({eqn.params.get('name', '')})")
    try:
      return _jaxpr.walk(jaxpr, [_Val()] * len(consts), ins, self.step, loc)
    finally:
      self.calls.pop()

  def _product(self, eqn, ins: list[_Val], loc: tuple[int, ...]) -> _Val:
    what = self._where(_describe(eqn))
    x, k = ins[0], ins[1]
    found = _operands(x, k, self.names)
    if found is None:
      rule = _dense if eqn.primitive.name == "dot_general" else _conv
      shape = lambda v: tuple(v.aval.shape)
      found = rule(
        eqn.params, shape(eqn.invars[0]), shape(eqn.invars[1]), self.shapes[k.leaf], self.examples
      )
    if isinstance(found, str):
      self.skipped.append(f"{what}: {found}")
      for v in (x, k):
        if v.leaf is not None:
          self._use(v.leaf, "other", None, f"{what}: {found}")
      return _Val(data=x.data or k.data)
    inputs, output_grads, d_out = found
    match = Match(self.names[k.leaf][:-1], inputs, output_grads)
    self.candidates.append(_Candidate(loc, match, what, d_out))
    self._use(k.leaf, "product", len(self.candidates) - 1, what)
    return _Val(data=True, product=len(self.candidates) - 1)

  def _bias(self, ins: list[_Val]) -> bool:
    """Records a parameter added to a candidate product's output; whether there was one."""
    for y, b in ((ins[0], ins[1]), (ins[1], ins[0])):
      if y.product is not None and b.leaf is not None:
        what = f"added to the output of {self.candidates[y.product].what}"
        self._use(b.leaf, "bias", y.product, what)
        return True
    return False


def _layers(m: _Matcher) -> dict[int, list[int]]:
  """Each kernel that is a layer -> its candidate products.

  Raises:
    ValueError: for a kernel used both in a candidate product and otherwise.
  """
  layers = {}
  for leaf, uses in m.uses.items():
    products = [u.product for u in uses if u.kind == "product"]
    others = [u.what for u in uses if u.kind != "product"]
    if products and others:
      raise ValueError(
        f"layer {'/'.join(m.names[leaf][:-1])!r}: its kernel is matched in "
        f"{m.candidates[products[0]].what} but also {others[0]}, where its curvature stats "
        "cannot be captured, so they would miss that use. Compute that use from a separate "
        "parameter, or name the parameter other than 'kernel' to leave it to the optimizer's "
        "fallback"
      )
    if products:
      layers[leaf] = products
  return layers


def _check_bias(m: _Matcher, bias: int, products: list[int]) -> None:
  """Raises unless the layer's ``bias`` is added to each of its products' outputs, only."""
  layer = "/".join(m.names[bias][:-1])
  uses = m.uses.get(bias, [])
  added = {u.product for u in uses if u.kind == "bias"}
  strays = [u.what for u in uses if u.kind != "bias" or u.product not in products]
  missing = [c for c in products if c not in added]
  if strays or missing:
    where = f"it is {strays[0]}" if strays else "it is not used there"
    product = m.candidates[(missing or products)[0]].what
    raise ValueError(
      f"layer {layer!r}: its bias must be added to the output of its product {product}, but "
      f"{where}; the optimizer would precondition it as this layer's bias. Add it to the "
      "product's output (x @ kernel + bias), or name it other than 'bias' to leave it to the "
      "optimizer's fallback"
    )
  d_out, size = m.candidates[products[0]].d_out, math.prod(m.shapes[bias])
  if size != d_out:
    raise ValueError(
      f"layer {layer!r}: its bias has {size} entries but its products have {d_out} outputs"
    )


def _why(m: _Matcher, leaf: int, index: dict[tuple[str, ...], int]) -> str:
  """Why a parameter has no stats."""
  names = m.names[leaf]
  uses = "; ".join(dict.fromkeys(u.what for u in m.uses.get(leaf, []))) or "not used"
  if names[-1] == "kernel":
    return uses
  if names[-1] == "bias" and (*names[:-1], "kernel") in index:
    return f"the bias of a kernel that is not matched ({uses})"
  return f"not a layer's kernel or bias ({uses})"


def _resolve(m: _Matcher) -> Analysis:
  index = {names: i for i, names in enumerate(m.names)}
  layers = _layers(m)
  covered = set(layers)
  for kernel, products in layers.items():
    bias = index.get((*m.names[kernel][:-1], "bias"))
    if bias is not None:
      _check_bias(m, bias, products)
      covered.add(bias)
  matches = {c.loc: c.match for c in m.candidates}
  report = Report(
    {
      "/".join(m.names[k][:-1]): tuple(m.candidates[c].what for c in cs) for k, cs in layers.items()
    },
    {"/".join(m.names[i]): _why(m, i, index) for i in range(len(m.names)) if i not in covered},
    tuple(m.skipped),
  )
  inline = frozenset(loc[:i] for loc in matches for i in range(1, len(loc)))
  return Analysis(matches, inline, report)


def examples_of(inputs: Any) -> int:
  """The number of examples: the inputs' leading axis."""
  leaves = jax.tree.leaves(inputs)
  if not leaves or not jnp.ndim(leaves[0]):
    raise ValueError(
      "inputs must be an array or a pytree of arrays whose leading axis is the examples, got "
      f"{jax.tree.map(jnp.shape, inputs)!r}"
    )
  return jnp.shape(leaves[0])[0]


def match(closed, params: Any, inputs: Any) -> Analysis:
  """The layers of ``closed``, the jaxpr of ``f(params, inputs)`` (see the module docstring).

  Raises:
    ValueError: naming the layer, for a kernel used both in a layer's product and
      otherwise, or a bias that is not added to its layer's products.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  names = [tuple(key_name(k) for k in path) for path, _ in flat]
  invars = closed.jaxpr.invars
  shapes = [tuple(v.aval.shape) for v in invars[: len(names)]]
  m = _Matcher(names, shapes, examples_of(inputs))
  args = [_Val(leaf=i) for i in range(len(names))]
  args += [_Val(data=True)] * (len(invars) - len(names))
  _jaxpr.walk(closed.jaxpr, [_Val()] * len(closed.consts), args, m.step)
  return _resolve(m)
