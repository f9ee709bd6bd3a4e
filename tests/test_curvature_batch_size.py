"""``curvature_batch_size=k``: the stats of the batch's first ``k`` examples, and
``quadratic_batch_size=q``: the quadratic model of its first ``q``; the loss, gradients and
``value_fn`` of the whole batch (Linen and NNX).

The stats are those of the helper run on the first ``k`` examples alone with
``curvature_batch_size=None``: the same key (sampled targets drawn for those ``k``), weights
``w[:k]`` (so each row carries ``sqrt(k w_j / sum_{i<k} w_i)``, not the whole batch's
``sqrt(B w_j / W)``), and layers that mix examples (BatchNorm) see only those ``k``. Checked
against that helper call and against per-example gradients from ``jax.vmap(jax.grad(...))``.
"""

import functools
import pathlib
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

F64 = jnp.float64
B, K = 8, 3
# The values of curvature_batch_size tried: all examples, the first K, more than the batch has.
SIZES = {"all": None, "first": K, "over": B + 1}
# Weights whose first K examples do not carry their share (K / B) of the total, one of them zero:
# the stats' scaling on the subsample is not that of the whole batch.
WEIGHTS = (1.0, 0.0, 2.0, 1.0, 3.0, 0.5, 1.0, 2.0)


def ce(out, t):
  return optax.softmax_cross_entropy_with_integer_labels(out, t)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, param_dtype=F64)(jnp.tanh(nn.Dense(5, param_dtype=F64)(x)))


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.head = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.linear(x)))


class NNXBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
    self.norm = nnx.BatchNorm(5, param_dtype=F64, rngs=rngs)
    self.head = nnx.Linear(5, 3, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.norm(self.linear(x))))


def batch():
  x = jax.random.normal(jax.random.key(0), (B, 4), F64)
  t = jax.random.randint(jax.random.key(1), (B,), 0, 3)
  return x, t


def close(u, v, tol=1e-10):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), u, v)


def head_factor(w):
  """Each subsample row's factor on its own gradient: ``sqrt(K w_j / sum_{i<K} w_i)`` (or 1)."""
  if w is None:
    return jnp.ones(K, F64)
  return jnp.sqrt(K * w[:K] / w[:K].sum())


def check_oracle(stats, pe_grads, factor):
  """Each example's ``a_j g_j^T`` (summed over positions) is ``factor_j`` times its own gradient."""
  for name, s in stats.items():
    a = s.inputs.reshape(K, -1, s.inputs.shape[-1])
    g = s.output_grads.reshape(K, -1, s.output_grads.shape[-1])
    kernel = jnp.einsum("bti,bto->bio", a, g)
    ref = pe_grads[name]["kernel"][...].reshape(kernel.shape) * factor[:, None, None]
    np.testing.assert_allclose(kernel, ref, atol=1e-10)


def unpack(helper_out, params):
  """``(loss, grads, stats, curvature outputs at params, value_fn at params)`` of one call."""
  loss, grads, extra = helper_out
  cm = extra["curvature_model"]
  assert cm.loss == "softmax_cross_entropy"
  return loss, grads, extra["layer_stats"](), cm.outputs_fn(params), extra["value_fn"](params)


@functools.cache
def linen_params(model):
  return jax.jit(model.init)(jax.random.key(2), batch()[0])["params"]


@functools.partial(jax.jit, static_argnames=("model", "fisher"))
def linen_case(params, x, t, key, w, *, model, fisher):
  """In one compile, unweighted and with weights ``w``: the helper with ``curvature_batch_size``
  ``None``, ``K`` and ``B + 1`` on the batch, the helper on the first K examples alone, at
  ``params`` and (``value_fn``) at other params; and the oracle, their per-example gradients
  (``jax.vmap``) for their targets (empirical) or for targets drawn from the model's predictions
  (sampled)."""
  helper = lambda k: cflax.value_grad_and_extra(
    model, fisher=fisher, curvature_batch_size=k, quadratic_batch_size=k
  )
  other = jax.tree.map(lambda p: 1.1 * p, params)

  def helpers(weights):
    w_k = None if weights is None else weights[:K]
    calls = {name: helper(k)(params, x, t, key, weights=weights) for name, k in SIZES.items()}
    calls["head"] = helper(None)(params, x[:K], t[:K], key, weights=w_k)
    return {name: unpack(call, other) for name, call in calls.items()}

  if fisher == "empirical":
    targets = t[:K]
  else:
    targets = jax.random.categorical(key, model.apply({"params": params}, x[:K]), axis=-1)

  def one(p, xj, tj):
    return ce(model.apply({"params": p}, xj[None]), tj[None])[0]

  pe = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x[:K], targets)
  loss_at_other = ce(model.apply({"params": other}, x), t)
  return (
    {False: helpers(None), True: helpers(w)},
    pe,
    loss_at_other,
    model.apply({"params": other}, x[:K]),
  )


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_linen(x64, fisher):
  model, (x, t), w = MLP(), batch(), jnp.array(WEIGHTS, F64)
  cases, pe, loss_at_other, outputs_at_other = linen_case(
    linen_params(model), x, t, jax.random.key(3), w, model=model, fisher=fisher
  )
  for weighted, calls in cases.items():
    ref_loss, ref_grads, full, _, ref_value = calls["all"]
    loss, grads, stats, outputs, value = calls["first"]
    # Loss, gradients and value_fn: the whole batch's.
    close(loss, ref_loss)
    close(grads, ref_grads)
    close(value, ref_value)
    close(value, jnp.sum(w * loss_at_other) / w.sum() if weighted else loss_at_other.mean())
    # The curvature model and the stats: those of the first K examples alone.
    np.testing.assert_array_equal(outputs.shape, (K, 3))
    close(outputs, outputs_at_other)
    assert all(s.inputs.shape[0] == K and s.output_grads.shape[0] == K for s in stats.values())
    close(stats, calls["head"][2])
    factor = head_factor(w if weighted else None)
    check_oracle(stats, pe, factor)
    with pytest.raises(AssertionError):  # the oracle tells the examples apart
      check_oracle(stats, jax.tree.map(lambda v: v[::-1], pe), factor)
    if fisher == "empirical" and weighted:  # the whole batch's sqrt(B w_j / W) is not the head's
      first_rows = jax.tree.map(lambda v: v[:K], full)
      assert not np.allclose(stats["Dense_1"].output_grads, first_rows["Dense_1"].output_grads)
      close(stats["Dense_1"].inputs, first_rows["Dense_1"].inputs)
    # A batch smaller than curvature_batch_size uses all of it: the same as None.
    close(calls["over"], calls["all"])


def nnx_per_example(model, x, t):
  graphdef, params = nnx.split(model, nnx.Param)

  def one(p, xj, tj):
    return ce(nnx.merge(graphdef, p)(xj[None]), tj[None])[0]

  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, t)


@nnx.jit
def nnx_case(model, x, t, key, w):
  """In one compile, for each Fisher: the helper with ``curvature_batch_size`` ``None``, ``K``
  and ``B``, the helper on the first K examples alone, and the oracle's per-example gradients."""
  out = {}
  params = nnx.state(model, nnx.Param)
  for fisher in ("sampled", "empirical"):

    def helper(k, x, t, w, fisher=fisher):
      return unpack(
        cflax.nnx_value_grad_and_extra(
          model,
          x,
          t,
          key,
          fisher=fisher,
          weights=w,
          curvature_batch_size=k,
          quadratic_batch_size=k,
        ),
        params,
      )

    calls = {name: helper(k, x, t, w) for name, k in {"all": None, "first": K, "B": B}.items()}
    calls["head"] = helper(None, x[:K], t[:K], w[:K])
    if fisher == "empirical":
      targets = t[:K]
    else:
      targets = jax.random.categorical(key, model(x[:K]), axis=-1)
    out[fisher] = calls, nnx_per_example(model, x[:K], targets)
  return out, model(x[:K])


def test_nnx(x64):
  x, t = batch()
  w = jnp.array(WEIGHTS, F64)
  cases, outputs_k = nnx_case(NNXMLP(nnx.Rngs(0)), x, t, jax.random.key(3), w)
  for calls, pe in cases.values():
    ref_loss, ref_grads, _, _, ref_value = calls["all"]
    loss, grads, stats, outputs, value = calls["first"]
    close(loss, ref_loss)
    close(grads, ref_grads)
    close(value, ref_value)
    close(value, loss)  # value_fn at the same params is the loss
    close(outputs, outputs_k)
    assert set(stats) == {"linear", "head"} and stats["head"].output_grads.shape == (K, 3)
    close(stats, calls["head"][2])
    check_oracle(stats, pe, head_factor(w))
    # curvature_batch_size equal to the batch size is the whole batch (sampled: the same draw).
    close(calls["B"], calls["all"])


@nnx.jit
def nnx_state_case(ours, ref, head_model, x, t, key):
  return (
    oracles.with_stats(cflax.nnx_value_grad_and_extra)(ours, x, t, key, curvature_batch_size=K),
    oracles.with_stats(cflax.nnx_value_grad_and_extra)(ref, x, t, key, curvature_batch_size=None),
    oracles.with_stats(cflax.nnx_value_grad_and_extra)(
      head_model, x[:K], t[:K], key, curvature_batch_size=None
    ),
  )


def test_nnx_state(x64):
  """Batch statistics written back are the whole batch's; the curvature pass changes nothing."""
  x, t = batch()
  ours, ref, head_model = (NNXBatchNorm(nnx.Rngs(0)) for _ in range(3))
  (loss, grads, stats), (ref_loss, ref_grads, _), (_, _, head) = nnx_state_case(
    ours, ref, head_model, x, t, jax.random.key(3)
  )
  close(loss, ref_loss)
  close(grads, ref_grads)
  close(ours.norm.mean[...], ref.norm.mean[...])
  close(ours.norm.var[...], ref.norm.var[...])
  # The stats are those of the model run on the K examples alone (batch statistics of K).
  close(stats, head)
  assert not np.allclose(ours.norm.mean[...], head_model.norm.mean[...])


@pytest.mark.parametrize("name", ["curvature_batch_size", "quadratic_batch_size"])
def test_bad_values(x64, name):
  model, (x, t) = MLP(), batch()
  key = jax.random.key(3)
  nnx_model = NNXMLP(nnx.Rngs(0))
  for bad in (0, -2, 2.0, 0.0, True, "3"):
    message = f"{name} must be None, a positive int.*" + re.escape(f"got {bad!r}")
    with pytest.raises(ValueError, match=message):
      cflax.value_grad_and_extra(model, **{name: bad})
    with pytest.raises(ValueError, match=message):
      cflax.nnx_value_grad_and_extra(nnx_model, x, t, key, **{name: bad})
    with pytest.raises(ValueError, match=message):
      cgfac.value_grad_and_extra(lambda p, x: x, **{name: bad})


def _mlp_apply(params, x):
  return MLP().apply({"params": params}, x)


@pytest.mark.parametrize("front", ["linen", "nnx", "jax"])
def test_the_quadratic_model_has_its_own_examples(x64, front):
  """By default the quadratic model runs on the batch's first quarter (2 of 8), whatever
  ``curvature_batch_size`` is; ``quadratic_batch_size`` takes an int, a fraction or ``None``,
  and changes neither the stats nor the loss, gradients and ``value_fn``."""
  (x, t), key = batch(), jax.random.key(3)
  if front == "nnx":
    model = NNXMLP(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    apply = lambda p, x: nnx.merge(nnx.graphdef(model), p)(x)
    call = lambda **o: cflax.nnx_value_grad_and_extra(model, x, t, key, **o)
  else:
    params = linen_params(MLP())
    apply = _mlp_apply
    make = cflax.value_grad_and_extra if front == "linen" else cgfac.value_grad_and_extra
    call = lambda **o: make(MLP() if front == "linen" else _mlp_apply, **o)(params, x, t, key)
  other = jax.tree.map(lambda p: 0.9 * p, params)
  ref = unpack(call(curvature_batch_size=None, quadratic_batch_size=None), other)
  assert ref[3].shape == (B, 3)
  for options, rows in [
    ({}, 2),
    ({"curvature_batch_size": K}, 2),
    ({"quadratic_batch_size": 5}, 5),
    ({"quadratic_batch_size": 0.5}, 4),
    ({"quadratic_batch_size": B + 1}, B),
  ]:
    loss, grads, stats, outputs, value = unpack(call(**options), other)
    close(outputs, apply(other, x[:rows]))  # the model on the first rows examples, at other
    close((loss, grads, value), (ref[0], ref[1], ref[4]))
    stats_rows = options.get("curvature_batch_size") or B
    assert all(s.inputs.shape[0] == stats_rows for s in stats.values())
    if stats_rows == B:
      close(stats, ref[2])


def test_a_fraction_of_the_batch(x64):
  """A float is a fraction of the batch (rounded, at least one example): 0.5 of 8 is 4."""
  model, (x, t) = MLP(), batch()
  key = jax.random.key(3)
  params = model.init(jax.random.key(0), x)["params"]
  half = cflax.value_grad_and_extra(model, curvature_batch_size=0.5)(params, x, t, key)[2]
  four = cflax.value_grad_and_extra(model, curvature_batch_size=4)(params, x, t, key)[2]
  close(half["layer_stats"](), four["layer_stats"]())
  tiny = cflax.value_grad_and_extra(model, curvature_batch_size=0.01)(params, x, t, key)[2]
  assert jax.tree.leaves(tiny["layer_stats"]())[0].shape[0] == 1
