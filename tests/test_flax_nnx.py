"""NNX capture: per-example oracle, shared layers, transforms, state and RNG streams written back,
``cgfac()`` under ``nnx.jit`` (training through ``nnx.Optimizer``: ``tests/test_train_digits.py``;
real models: ``tests/test_real_models.py``)."""

import pathlib
import sys

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

# (loss, grads, stats) of the NNX helper.
nnx_stats = oracles.with_stats(cflax.nnx_value_grad_and_extra)
F64 = jnp.float64
ORIGINAL_CALL = nnx.Linear.__call__


def ce(out, t):
  per = optax.softmax_cross_entropy_with_integer_labels(out, t)
  return per.reshape(per.shape[0], -1).mean(1)


class MLP(nnx.Module):
  def __init__(self, rngs, dtype=jnp.float32):
    self.layers = nnx.List(
      [
        nnx.Linear(3, 6, param_dtype=dtype, rngs=rngs),
        nnx.Linear(6, 5, use_bias=False, param_dtype=dtype, rngs=rngs),
      ]
    )
    self.head = nnx.Linear(5, 4, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return self.head(x)


def per_example_grads(model, x, t):
  graphdef, params = nnx.split(model, nnx.Param)

  def one(p, xj, tj):
    return ce(nnx.merge(graphdef, p)(xj[None]), tj[None])[0]

  return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, x, t)


def check_layer(stats, pe, grads, path, examples, tol=1e-6, loss_positions=1):
  """Captured ``a_j g_j^T`` (summed over positions) equals each per-example gradient; ``g``
  carries ``sqrt(loss_positions)``, the outputs' positions (see ``cgfac_optax._capture``)."""
  node_s, node_p, node_g = stats, pe, grads
  for name in path:
    node_s, node_p, node_g = node_s[name], node_p[name], node_g[name]
  a = node_s.inputs.reshape(examples, -1, node_s.inputs.shape[-1])
  g = node_s.output_grads.reshape(examples, -1, node_s.output_grads.shape[-1])
  g = g / np.sqrt(loss_positions)
  pe_kernel = jnp.einsum("bti,bto->bio", a, g)
  np.testing.assert_allclose(pe_kernel, node_p["kernel"][...], atol=tol)
  np.testing.assert_allclose(pe_kernel.mean(0), node_g["kernel"][...], atol=tol)
  if "bias" in node_p:
    np.testing.assert_allclose(g.sum(1), node_p["bias"][...], atol=tol)


def test_per_example_oracle(x64):
  model, b = MLP(nnx.Rngs(0), F64), 5
  x = jax.random.normal(jax.random.key(1), (b, 3), F64)
  t = jax.random.randint(jax.random.key(2), (b,), 0, 4)
  loss, grads, stats = nnx_stats(model, x, t, fisher="empirical")

  ref_loss, ref_grads = nnx.value_and_grad(lambda m: ce(m(x), t).mean())(model)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, ref_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)

  pe = per_example_grads(model, x, t)
  assert set(stats) == {"layers", "head"} and set(stats["layers"]) == {0, 1}
  for path in [("layers", 0), ("layers", 1), ("head",)]:
    check_layer(stats, pe, grads, path, b)
  assert nnx.Linear.__call__ is ORIGINAL_CALL  # the wrap is temporary


class SeqShared(nnx.Module):
  """One layer applied to (B, T, d) and then a second time."""

  def __init__(self, rngs):
    self.shared = nnx.Linear(3, 3, param_dtype=F64, rngs=rngs)
    self.head = nnx.Linear(3, 4, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.shared(x))
    h = jnp.tanh(self.shared(h))
    return self.head(h)


def test_sequence_and_shared_layer(x64):
  model, b, t_len = SeqShared(nnx.Rngs(0)), 3, 4
  x = jax.random.normal(jax.random.key(1), (b, t_len, 3), F64)
  t = jax.random.randint(jax.random.key(2), (b, t_len), 0, 4)
  _, grads, stats = nnx_stats(model, x, t, fisher="empirical")
  assert stats["head"].inputs.shape == (b, t_len, 3)
  assert stats["shared"].inputs.shape == (b, 2 * t_len, 3)  # both calls' positions
  np.testing.assert_allclose(stats["shared"].inputs[:, :t_len], x)
  pe = per_example_grads(model, x, t)
  check_layer(stats, pe, grads, ("shared",), b, loss_positions=t_len)
  check_layer(stats, pe, grads, ("head",), b, loss_positions=t_len)


class Remat(nnx.Module):
  def __init__(self, rngs):
    self.inner = nnx.Linear(3, 3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.remat(lambda m, v: m(v))(self.inner, x)
    return self.head(h)


class Vmapped(nnx.Module):
  def __init__(self, rngs):
    self.inner = nnx.Linear(3, 3, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.vmap(lambda m, v: m(v), in_axes=(None, 0))(self.inner, x)
    return self.head(h)


class Scanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(3, 3, rngs=rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, h):
      return jnp.tanh(block(h))

    return self.head(body(self.blocks, x))


@pytest.mark.parametrize(
  "cls, layer",
  [(Remat, "inner"), (Vmapped, "inner"), (Scanned, "blocks")],
)
def test_transform_inside_model_raises_naming_the_layer(cls, layer):
  model = cls(nnx.Rngs(0))
  x, t = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match=f"layer '{layer}' \\(Linear\\) is called inside"):
    nnx_stats(model, x, t, fisher="empirical")
  assert nnx.Linear.__call__ is ORIGINAL_CALL  # restored after the error


class MyLinear(nnx.Linear):
  pass


class WithSubclass(nnx.Module):
  def __init__(self, rngs):
    self.a = MyLinear(3, 4, rngs=rngs)
    self.b = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.b(jnp.tanh(self.a(x)))


def test_subclass_captured_once():
  model = WithSubclass(nnx.Rngs(0))
  x, t = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
  _, _, stats = nnx_stats(model, x, t, fisher="empirical")
  assert stats["a"].inputs.shape == (4, 3)  # one call, not one per patched class
  assert "__call__" not in MyLinear.__dict__


class WithBatchNorm(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(self.linear(x)))


def test_state_written_back_like_nnx_grad():
  x, t = jax.random.normal(jax.random.key(0), (8, 3)), jnp.arange(8) % 2
  ours, ref = WithBatchNorm(nnx.Rngs(0)), WithBatchNorm(nnx.Rngs(0))
  nnx_stats(ours, x, t, fisher="empirical")
  nnx.grad(lambda m: ce(m(x), t).mean())(ref)
  mean = ours.norm.mean[...]
  assert not np.allclose(mean, 0.0)
  np.testing.assert_allclose(mean, ref.norm.mean[...], rtol=1e-6)


class Noisy(nnx.Module):
  """Dropout with its own RNG stream, one drawing from the call's ``rngs``, and BatchNorm."""

  def __init__(self, rngs, dtype=F64):
    self.linear = nnx.Linear(3, 6, param_dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(6, param_dtype=dtype, rngs=rngs)
    self.stored = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
    self.given = nnx.Dropout(0.3)
    self.head = nnx.Linear(6, 2, param_dtype=dtype, rngs=rngs)

  def __call__(self, x, *, rngs):
    h = self.given(self.stored(jnp.tanh(self.norm(self.linear(x)))), rngs=rngs)
    return self.head(h)


def same(u, v):
  """Equal arrays, PRNG keys by their data."""
  data = lambda w: jax.random.key_data(w) if jnp.issubdtype(w.dtype, jax.dtypes.prng_key) else w
  np.testing.assert_array_equal(data(u), data(v))


def test_rng_streams_and_state_written_back_like_nnx_value_and_grad(x64):
  """Two steps: the same loss and gradients as ``nnx.value_and_grad`` (the same dropout masks),
  and the model's and the call's RNG counts and batch statistics where it leaves them (the
  stats pass and ``value_fn`` run on copies)."""
  x, t = jax.random.normal(jax.random.key(0), (8, 3), F64), jnp.arange(8) % 2
  ours, ref = Noisy(nnx.Rngs(0)), Noisy(nnx.Rngs(0))
  our_rngs, ref_rngs = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
  for _ in range(2):
    loss, grads, extra = cflax.nnx_value_grad_and_extra(
      ours, x, t, jax.random.key(1), rngs=our_rngs, quadratic_batch_size=None
    )
    # The extra passes, run after the write-back, see the state the loss pass saw: the same
    # dropout masks, so the loss again at the same params (the quadratic model on the whole
    # batch, whose masks are the loss pass's).
    params = nnx.state(ours, nnx.Param)
    np.testing.assert_allclose(extra["value_fn"](params), loss, rtol=1e-12)
    outputs = extra["curvature_model"].outputs_fn(params)
    np.testing.assert_allclose(ce(outputs, t).mean(), loss, rtol=1e-12)
    extra["layer_stats"]()
    ref_loss, ref_grads = nnx.value_and_grad(lambda m, r: ce(m(x, rngs=r), t).mean())(ref, ref_rngs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, ref_grads)
    jax.tree.map(same, nnx.state(ours), nnx.state(ref))
    jax.tree.map(same, nnx.state(our_rngs), nnx.state(ref_rngs))
  assert int(ours.stored.rngs.count[...]) == 2 and int(our_rngs.dropout.count[...]) == 2


def test_cgfac_under_nnx_jit_with_a_forward_pass_that_changes_state():
  """``cgfac()`` reads the quadratic model, which runs the model again inside ``update``; with
  BatchNorm in training mode and Dropout holding its own RNG stream, the helpers used to run the
  caller's Variables in that other trace (``TraceContextError: Cannot mutate RngCount from a
  different trace level``)."""
  model = Noisy(nnx.Rngs(0), jnp.float32)
  optimizer = nnx.Optimizer(model, cgfac.cgfac(), wrt=nnx.Param)
  rngs = nnx.Rngs(dropout=3)
  x = jax.random.normal(jax.random.key(0), (16, 3))
  t = (x[:, 0] > 0).astype(jnp.int32)

  @nnx.jit
  def step(model, optimizer, rngs, key):
    loss, grads, extra = cflax.nnx_value_grad_and_extra(model, x, t, key, rngs=rngs)
    optimizer.update(model, grads, **extra)
    return loss

  mean = model.norm.mean[...]
  losses = [float(step(model, optimizer, rngs, jax.random.key(i))) for i in range(3)]
  assert np.all(np.isfinite(losses))
  assert not np.allclose(model.norm.mean[...], mean)
  # One draw per step from each stream: the loss pass's, written back.
  assert int(model.stored.rngs.count[...]) == 3 and int(rngs.dropout.count[...]) == 3
  assert float(optimizer.opt_state[0].coefficients[0]) != 0.0


def test_errors():
  model = MLP(nnx.Rngs(0))
  x, t = jnp.ones((4, 3)), jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    nnx_stats(model, x, t)
  with pytest.raises(ValueError, match="loss must be one of"):
    nnx_stats(model, x, t, loss="hinge")
  with pytest.raises(ValueError, match=r"targets of shape \(4, 4\) .* got \(4,\)"):
    nnx_stats(model, x, t, loss="squared_error", fisher="empirical")
  norm_only = nnx.LayerNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="calls no layer"):
    nnx_stats(norm_only, x, jnp.zeros((4,), jnp.int32), fisher="empirical")
  assert nnx.Linear.__call__ is ORIGINAL_CALL


class AttentionEinsum(nnx.Module):
  """``nnx.MultiHeadAttention`` (four ``nnx.LinearGeneral``), a dense ``nnx.Einsum`` and one that
  is not a dense map (its kernel is batched over the heads)."""

  def __init__(self, rngs):
    self.attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=4, qkv_features=4, decode=False, param_dtype=F64, rngs=rngs
    )
    self.proj = nnx.Einsum("btd,dhf->bthf", (4, 2, 3), (2, 3), param_dtype=F64, rngs=rngs)
    self.per_head = nnx.Einsum("bthf,hfg->bthg", (2, 3, 3), param_dtype=F64, rngs=rngs)
    self.head = nnx.Linear(6, 4, param_dtype=F64, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.per_head(self.proj(jnp.tanh(self.attention(x)))))
    return self.head(h.reshape(h.shape[:2] + (6,)))


def test_attention_linear_general_and_dense_einsum_are_captured(x64):
  model, b = AttentionEinsum(nnx.Rngs(0)), 3
  x = jax.random.normal(jax.random.key(1), (b, 5, 4), F64)
  t = jax.random.randint(jax.random.key(2), (b, 5), 0, 4)
  capture = nnx.jit(lambda m: nnx_stats(m, x, t, fisher="empirical")[1:])
  grads, stats = capture(model)
  assert set(stats) == {"attention", "proj", "head"}  # per_head is not a dense map
  assert set(stats["attention"]) == {"query", "key", "value", "out"}
  pe = per_example_grads(model, x, t)
  layers = [("attention", n) for n in ("query", "key", "value", "out")] + [("proj",), ("head",)]
  for path in layers:
    s, p = stats, pe
    for name in path:
      s, p = s[name], p[name]
    d_in, d_out = s.inputs.shape[-1], s.output_grads.shape[-1]
    a = s.inputs.reshape(b, -1, d_in)
    g = s.output_grads.reshape(b, -1, d_out) / np.sqrt(5)  # the outputs' 5 positions
    # The kernel (in axes..., out axes...) as (d_in, d_out), per example.
    want = p["kernel"][...].reshape(b, d_in, d_out)
    # Query and key reach the loss through the attention's softmax, whose per-example and
    # batched evaluations agree to about 1e-8 only (the key bias's gradient is zero in exact
    # arithmetic, the softmax being shift-invariant, so both give noise of that size, which
    # depends on XLA's code generation); the other layers agree to rounding.
    np.testing.assert_allclose(jnp.einsum("bti,bto->bio", a, g), want, rtol=1e-4, atol=5e-8)
    np.testing.assert_allclose(g.sum(1), p["bias"][...].reshape(b, d_out), rtol=1e-4, atol=5e-8)
  # Out of the heads: the contracted (heads, head_dim) axes become one input axis of width 4.
  assert stats["attention"]["out"].inputs.shape == (b, 5, 4)
  assert stats["proj"].output_grads.shape == (b, 5, 6)
  # (Training such a model: tests/test_never_poisoned.py.)


def test_einsum_rule_applies_to_dense_maps_only():
  from cgfac_optax.flax import _rules

  dense = ["btd,df->btf", "...d,df->...f", "bd,dhf->bhf", "bij,ijf->bf"]
  other = ["bthf,hfg->bthg", "bd,fd->bf", "bd,df->fb", "btd,df->bf", "db,df->bf", "bd,d->b"]
  for equation in dense:
    assert _rules._dense_einsum(equation) is not None, equation
  for equation in other:
    assert _rules._dense_einsum(equation) is None, equation
