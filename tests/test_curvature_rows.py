"""``curvature_rows``: stats of a batch's first ``k`` examples from their own pass (sampled Fisher)
or the first ``k`` rows of the one backward pass (empirical), loss and gradients of the whole batch
(Linen and NNX, against per-example gradients from ``jax.vmap(jax.grad(...))``)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cgfac_optax import flax as cflax

F64 = jnp.float64
B, K = 8, 3
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


@functools.cache
def linen_params(model):
  return jax.jit(model.init)(jax.random.key(2), batch()[0])["params"]


@functools.partial(jax.jit, static_argnames=("model", "fisher"))
def linen_case(params, x, t, key, w, *, model, fisher):
  """In one compile, unweighted and with weights ``w``: the helper without and with
  ``curvature_rows=K`` on the batch, the helper on the first K examples alone; and the oracle,
  their per-example gradients (``jax.vmap``) for their targets (empirical) or for targets drawn
  from the model's predictions (sampled)."""
  whole = cflax.value_grad_and_stats(model, fisher=fisher)
  sub = cflax.value_grad_and_stats(model, fisher=fisher, curvature_rows=K)

  def helpers(weights):
    _, _, head = whole(params, x[:K], t[:K], key, weights=None if weights is None else weights[:K])
    return whole(params, x, t, key, weights=weights), sub(params, x, t, key, weights=weights), head

  if fisher == "empirical":
    targets = t[:K]
  else:
    targets = jax.random.categorical(key, model.apply({"params": params}, x[:K]), axis=-1)

  def one(p, xj, tj):
    return ce(model.apply({"params": p}, xj[None]), tj[None])[0]

  pe = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x[:K], targets)
  return {False: helpers(None), True: helpers(w)}, pe


def nnx_per_example(model, x, t):
  graphdef, params = nnx.split(model, nnx.Param)

  def one(p, xj, tj):
    return ce(nnx.merge(graphdef, p)(xj[None]), tj[None])[0]

  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, t)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_linen(x64, fisher):
  model, (x, t), w = MLP(), batch(), jnp.array(WEIGHTS, F64)
  cases, pe = linen_case(
    linen_params(model), x, t, jax.random.key(3), w, model=model, fisher=fisher
  )
  for weighted, ((ref_loss, ref_grads, full), (loss, grads, stats), head) in cases.items():
    # Loss and gradients: the whole batch's.
    close(loss, ref_loss)
    close(grads, ref_grads)
    # Stats: those of the first K examples alone (the helper on them, with the same key).
    assert all(s.inputs.shape[0] == K and s.output_grads.shape[0] == K for s in stats.values())
    close(stats, head)
    factor = head_factor(w if weighted else None)
    check_oracle(stats, pe, factor)
    with pytest.raises(AssertionError):  # the oracle tells the examples apart
      check_oracle(stats, jax.tree.map(lambda v: v[::-1], pe), factor)
    first_rows = jax.tree.map(lambda v: v[:K], full)
    if fisher == "empirical" and weighted:  # the whole batch's sqrt(B w_j / W) is not the head's
      assert not np.allclose(stats["Dense_1"].output_grads, first_rows["Dense_1"].output_grads)
      close(stats["Dense_1"].inputs, first_rows["Dense_1"].inputs)
    elif fisher == "empirical":
      close(stats, first_rows)


@nnx.jit
def nnx_case(model, x, t, key, w):
  """In one compile, for each Fisher: the helper without ``curvature_rows``, with ``K`` and with
  ``B`` on the batch, the helper on the first K examples alone, and the oracle's per-example
  gradients."""
  out = {}
  for fisher in ("sampled", "empirical"):
    vgs = functools.partial(cflax.nnx_value_grad_and_stats, fisher=fisher)
    ref = vgs(model, x, t, key, weights=w)
    sub = vgs(model, x, t, key, weights=w, curvature_rows=K)
    all_rows = vgs(model, x, t, key, weights=w, curvature_rows=B)
    _, _, head = vgs(model, x[:K], t[:K], key, weights=w[:K])
    if fisher == "empirical":
      targets = t[:K]
    else:
      targets = jax.random.categorical(key, model(x[:K]), axis=-1)
    out[fisher] = ref, sub, all_rows, head, nnx_per_example(model, x[:K], targets)
  return out


def test_nnx(x64):
  x, t = batch()
  w = jnp.array(WEIGHTS, F64)
  cases = nnx_case(NNXMLP(nnx.Rngs(0)), x, t, jax.random.key(3), w)
  for ref, (loss, grads, stats), all_rows, head, pe in cases.values():
    close(loss, ref[0])
    close(grads, ref[1])
    assert set(stats) == {"linear", "head"} and stats["head"].output_grads.shape == (K, 3)
    close(stats, head)
    check_oracle(stats, pe, head_factor(w))
    # curvature_rows equal to the batch size is the whole batch (sampled: the same draw).
    close(all_rows, ref)


@nnx.jit
def nnx_state_case(ours, ref, head_model, x, t, key):
  return (
    cflax.nnx_value_grad_and_stats(ours, x, t, key, curvature_rows=K),
    cflax.nnx_value_grad_and_stats(ref, x, t, key),
    cflax.nnx_value_grad_and_stats(head_model, x[:K], t[:K], key),
  )


def test_nnx_state(x64):
  """Batch statistics written back are the whole batch's; the subsample pass changes nothing."""
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


def test_bad_rows(x64):
  model, (x, t) = MLP(), batch()
  params, key = linen_params(model), jax.random.key(3)
  for bad in (0, -2, 2.0, True, "3"):
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
      cflax.value_grad_and_stats(model, curvature_rows=bad)
  vgs = cflax.value_grad_and_stats(model, curvature_rows=B + 1)
  message = rf"batch size \({B} examples\), got {B + 1}"
  with pytest.raises(ValueError, match=message):
    vgs(params, x, t, key)
  with pytest.raises(ValueError, match="mutable"):
    cflax.value_grad_and_stats(model, curvature_rows=K)(params, x, t, key, mutable=["batch_stats"])
  nnx_model = NNXMLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):
    cflax.nnx_value_grad_and_stats(nnx_model, x, t, key, curvature_rows=B + 1)
  with pytest.raises(ValueError, match=rf"batch size \({B} examples\), got 0"):
    cflax.nnx_value_grad_and_stats(nnx_model, x, t, key, curvature_rows=0)
