"""The stats pass inside a ``lax.cond`` branch: its convolutions in XLA:CPU's fast layout.

Reverse mode writes a convolution's gradients as convolutions with swapped feature and batch
(or kernel input and output) dimensions. XLA's CPU backend puts such convolutions in its
batch-first, channels-last, ``HWIO`` layout only in the program's top level, so in a branch
they ran several times slower. :func:`cgfac_optax._jaxpr.channels_last_convolutions` reruns a
function's program with every convolution in that layout: the oracle is the function itself
(the same numbers) and XLA's compiled program (every convolution in the branch canonical).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cgfac_optax as cgfac
from cgfac_optax._jaxpr import channels_last_convolutions

CANONICAL = {1: "b0f_0io->b0f", 2: "b01f_01io->b01f", 3: "b012f_012io->b012f"}


def _network(dimension_numbers, strides, padding, dilation, groups=1):
  def loss(x, w1, w2):
    conv = lambda x, w: lax.conv_general_dilated(
      x,
      w,
      strides,
      padding,
      rhs_dilation=dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=groups,
    )
    return jnp.sum(jnp.tanh(conv(jnp.tanh(conv(x, w1)), w2)) ** 2)

  return loss


CASES = {
  "NHWC, stride 2, SAME": (("NHWC", "HWIO", "NHWC"), (2, 2), "SAME", (1, 1), 1),
  "NCHW, OIHW, dilated": (("NCHW", "OIHW", "NCHW"), (1, 1), "VALID", (2, 1), 1),
  "1D, explicit padding": (("NWC", "WIO", "NWC"), (3,), [(2, 1)], (1,), 1),
  "3D": (("NDHWC", "DHWIO", "NDHWC"), (1, 2, 1), "SAME", (1, 1, 1), 1),
  "grouped": (("NHWC", "HWIO", "NHWC"), (1, 1), "SAME", (1, 1), 2),
}


def _operands(dimension_numbers, groups):
  lhs, rhs, _ = dimension_numbers
  n = len(lhs) - 2
  size = {"N": 3, "C": 4, "O": 4, "I": 4 // groups}
  shape = lambda spec: tuple(size.get(c, 9 - 2 * n) for c in spec)
  keys = jax.random.split(jax.random.key(0), 3)
  return [jax.random.normal(k, shape(s)) for k, s in zip(keys, (lhs, rhs, rhs))]


def _in_a_branch(fn):
  def run(*args):
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))
    return lax.cond(jnp.sum(args[0]) > -jnp.inf, lambda: fn(*args), lambda: zeros)

  return run


@pytest.mark.parametrize("case", CASES)
def test_same_gradients_run_in_a_branch(case):
  dimension_numbers, strides, padding, dilation, groups = CASES[case]
  grads = jax.grad(_network(dimension_numbers, strides, padding, dilation, groups), (0, 1, 2))
  operands = _operands(dimension_numbers, groups)
  rewritten = channels_last_convolutions(grads)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    jax.jit(_in_a_branch(rewritten))(*operands),
    jax.jit(grads)(*operands),
  )


def test_in_a_branch_every_convolution_of_the_gradient_to_the_inputs_is_canonical():
  """XLA's compiled branch, at sizes where it keeps convolutions as convolutions (it may turn
  tiny ones into products or swap their operands)."""
  loss = _network(("NHWC", "HWIO", "NHWC"), (2, 2), "SAME", (1, 1))
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (32, 16, 16, 8))
  w1, w2 = (0.3 * jax.random.normal(k, (3, 3, 8, 8)) for k in keys[1:])
  to_inputs = jax.grad(loss)  # what the stats pass takes: gradients to activations
  for fn, all_canonical in ((to_inputs, False), (channels_last_convolutions(to_inputs), True)):
    hlo = jax.jit(_in_a_branch(fn)).lower(x, w1, w2).compile().as_text()
    labels = re.findall(r"dim_labels=(\S+?),", hlo)
    assert len(labels) >= 4, labels  # two forward, two backward convolutions (at least)
    canonical = [label == CANONICAL[2] for label in labels]
    # As differentiated, the gradient's convolutions are not canonical inside the branch.
    assert all(canonical) if all_canonical else not all(canonical), labels


def test_calls_inside_are_rewritten_too_and_closures_are_kept():
  w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 2))
  conv = jax.jit(
    lambda x, w: lax.conv(x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), (1, 1), "SAME")
  )
  fn = lambda: jax.grad(lambda w: jnp.sum(conv(x, w) ** 2))(w)  # closes over x and w
  np.testing.assert_allclose(channels_last_convolutions(fn)(), fn(), rtol=1e-5)


def test_cgfac_reads_the_stats_of_a_cnn_in_a_branch_with_canonical_convolutions():
  """cgfac()'s amortized reading (curvature_every > 1) of a CNN's stats, on CPU."""

  def apply(params, x):
    conv = lambda x, p, s: lax.conv_general_dilated(
      x, p["kernel"], s, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(conv(x, params["c1"], (1, 1)))
    h = jnp.tanh(conv(h, params["c2"], (2, 2)))
    return jnp.mean(h, axis=(1, 2)) @ params["head"]["kernel"]

  keys = jax.random.split(jax.random.key(0), 5)
  params = {
    "c1": {"kernel": 0.3 * jax.random.normal(keys[0], (3, 3, 1, 8))},
    "c2": {"kernel": 0.3 * jax.random.normal(keys[1], (3, 3, 8, 8))},
    "head": {"kernel": jax.random.normal(keys[2], (8, 3))},
  }
  x = jax.random.normal(keys[3], (64, 16, 16, 1))
  y = jax.random.randint(keys[4], (64,), 0, 3)
  fn = cgfac.value_grad_and_extra(apply, loss="softmax_cross_entropy")
  tx = cgfac.cgfac()  # curvature_every=10: the stats pass sits in a lax.cond

  def step(params, state):
    _, grads, extra = fn(params, x, y, jax.random.key(0))
    return tx.update(grads, state, params, **extra)

  compiled = jax.jit(step).lower(params, tx.init(params)).compile()
  labels = re.findall(r"dim_labels=(\S+?),", compiled.as_text())
  # The loss pass (top level, canonicalized by XLA) and the stats pass in the branch.
  assert len(labels) >= 8 and set(labels) == {CANONICAL[2]}, labels
  updates, state = compiled(params, tx.init(params))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
