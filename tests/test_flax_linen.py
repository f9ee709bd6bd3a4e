"""Linen capture: per-example oracle, sequences, shared and lifted layers, collections
(BatchNorm), ``TrainState``, errors (training on digits: ``tests/test_train_digits.py``; real
models: ``tests/test_real_models.py``)."""

import functools
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

F64 = jnp.float64


def stats_helper(model, **kwargs):
  """``fn(params, inputs, targets, ...) -> (loss, grads, stats)`` of the Linen helper."""
  return oracles.with_stats(cflax.value_grad_and_extra(model, **kwargs))


# Independent per-example losses (the documented definitions), written with optax.
def per_example_loss(kind, out, t):
  if kind == "softmax_cross_entropy":
    per = optax.softmax_cross_entropy_with_integer_labels(out, t)
  elif kind == "sigmoid_binary_cross_entropy":
    per = optax.sigmoid_binary_cross_entropy(out, t).sum(-1)
  else:
    per = 0.5 * jnp.sum((out - t) ** 2, -1)
  return per.reshape(per.shape[0], -1).mean(1)


def make_targets(kind, key, out_shape):
  if kind == "softmax_cross_entropy":
    return jax.random.randint(key, out_shape[:-1], 0, out_shape[-1])
  if kind == "sigmoid_binary_cross_entropy":
    return jax.random.bernoulli(key, 0.5, out_shape).astype(F64)
  return jax.random.normal(key, out_shape, F64)


def per_example_grads(model, params, x, t, kind):
  """``jax.vmap(jax.grad(per_example_loss))``: one example at a time."""

  def one(p, xj, tj):
    out = model.apply({"params": p}, xj[None])
    return per_example_loss(kind, out, tj[None])[0]

  return jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, x, t)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(6, param_dtype=F64)(x))
    x = jnp.tanh(nn.Dense(5, use_bias=False, param_dtype=F64)(x))
    return nn.DenseGeneral(4, param_dtype=F64)(x)


def check_per_example(stats, grads, pe_grads, path, examples, tol=1e-6, loss_positions=1):
  """Captured ``a_j g_j^T`` (summed over positions) equals each per-example gradient.

  With ``P = loss_positions`` positions in the model's outputs the captured ``g`` carries
  ``sqrt(P)`` on top (see ``cgfac_optax._capture``), taken off here.
  """
  s = stats[path] if isinstance(path, str) else stats[path[0]][path[1]]
  a = s.inputs.reshape(examples, -1, s.inputs.shape[-1])
  g = s.output_grads.reshape(examples, -1, s.output_grads.shape[-1]) / np.sqrt(loss_positions)
  pe_kernel = jnp.einsum("bti,bto->bio", a, g)
  ref = pe_grads[path] if isinstance(path, str) else pe_grads[path[0]][path[1]]
  np.testing.assert_allclose(pe_kernel, ref["kernel"].reshape(pe_kernel.shape), atol=tol)
  np.testing.assert_allclose(
    pe_kernel.mean(0), grads[path]["kernel"].reshape(pe_kernel.shape[1:]), atol=tol
  )
  if "bias" in ref:
    np.testing.assert_allclose(g.sum(1), ref["bias"].reshape(examples, -1), atol=tol)


@pytest.mark.parametrize(
  "kind", ["softmax_cross_entropy", "sigmoid_binary_cross_entropy", "squared_error"]
)
def test_per_example_oracle(x64, kind):
  model, b = MLP(), 5
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets(kind, jax.random.key(2), (b, 4))
  vgs = stats_helper(model, loss=kind, fisher="empirical")
  loss, grads, stats = jax.jit(vgs)(params, x, t)

  mean_loss = lambda p: per_example_loss(kind, model.apply({"params": p}, x), t).mean()
  np.testing.assert_allclose(loss, mean_loss(params), rtol=1e-12)
  ref_grads = jax.grad(mean_loss)(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, ref_grads)

  pe = per_example_grads(model, params, x, t, kind)
  assert sorted(stats) == ["DenseGeneral_0", "Dense_0", "Dense_1"]
  for path in stats:
    check_per_example(stats, grads, pe, path, b)
  assert stats["Dense_1"].inputs.shape == (b, 6)  # no bias column in the stats


class SeqModel(nn.Module):
  """Dense over (B, T, d), DenseGeneral over axis 1 of (B, d, T) and over two axes."""

  @nn.compact
  def __call__(self, x):  # x: (B, T, 3)
    h = jnp.tanh(nn.Dense(4, param_dtype=F64)(x))  # (B, T, 4)
    h = jnp.swapaxes(h, 1, 2)  # (B, 4, T)
    h = jnp.tanh(nn.DenseGeneral((2, 3), axis=1, param_dtype=F64)(h))  # (B, T, 2, 3)
    h = nn.DenseGeneral(5, axis=(-2, -1), param_dtype=F64)(h)  # (B, T, 5)
    return h


def test_sequence_and_dense_general(x64):
  model, b, t_len = SeqModel(), 3, 4
  x = jax.random.normal(jax.random.key(0), (b, t_len, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets("softmax_cross_entropy", jax.random.key(2), (b, t_len, 5))
  vgs = stats_helper(model, fisher="empirical")
  _, grads, stats = jax.jit(vgs)(params, x, t)
  assert stats["Dense_0"].inputs.shape == (b, t_len, 3)
  assert stats["DenseGeneral_0"].inputs.shape == (b, t_len, 4)
  assert stats["DenseGeneral_0"].output_grads.shape == (b, t_len, 6)
  assert stats["DenseGeneral_1"].inputs.shape == (b, t_len, 6)
  pe = per_example_grads(model, params, x, t, "softmax_cross_entropy")
  for path in stats:
    check_per_example(stats, grads, pe, path, b, loss_positions=t_len)


class Shared(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(3, param_dtype=F64)
    h = jnp.tanh(dense(x))
    h = jnp.tanh(dense(h))  # the same layer, a second time
    return nn.Dense(2, param_dtype=F64)(h)


def test_layer_used_twice_contributes_both_calls(x64):
  model, b = Shared(), 4
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets("softmax_cross_entropy", jax.random.key(2), (b, 2))
  _, grads, stats = jax.jit(stats_helper(model, fisher="empirical"))(params, x, t)
  s = stats["Dense_0"]
  assert s.inputs.shape == (b, 2, 3) and s.output_grads.shape == (b, 2, 3)
  np.testing.assert_allclose(s.inputs[:, 0], x)  # first call's input
  pe = per_example_grads(model, params, x, t, "softmax_cross_entropy")
  check_per_example(stats, grads, pe, "Dense_0", b)
  check_per_example(stats, grads, pe, "Dense_1", b)


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.remat(nn.Dense)(5, param_dtype=F64)(x))
    return nn.Dense(3, param_dtype=F64)(h)


def test_remat_is_captured(x64):
  model, b = Remat(), 4
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets("softmax_cross_entropy", jax.random.key(2), (b, 3))
  _, grads, stats = jax.jit(stats_helper(model, fisher="empirical"))(params, x, t)
  assert sorted(stats) == ["CheckpointDense_0", "Dense_0"]
  pe = per_example_grads(model, params, x, t, "softmax_cross_entropy")
  for path in stats:
    check_per_example(stats, grads, pe, path, b)


class Cell(nn.Module):
  @nn.compact
  def __call__(self, c, x):
    h = jnp.tanh(nn.Dense(4, name="proj")(x) + c)
    return h, h


class ScanModel(nn.Module):
  @nn.compact
  def __call__(self, x):  # (B, T, d)
    scan = nn.scan(
      Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1
    )
    _, ys = scan(name="rnn")(jnp.zeros((x.shape[0], 4)), x)
    return nn.Dense(3)(ys)


class VmapModel(nn.Module):
  @nn.compact
  def __call__(self, x):
    vdense = nn.vmap(
      nn.Dense,
      variable_axes={"params": None},
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )
    return vdense(3, name="per_position")(x)


class VmapStacked(nn.Module):
  """A vmap that does map the capture collections: their values come out stacked."""

  @nn.compact
  def __call__(self, x):
    vdense = nn.vmap(
      nn.Dense,
      variable_axes={"params": None, "cgfac_inputs": 1, "cgfac_perturbations": 1},
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
    )
    return vdense(3, name="stacked")(x)


@pytest.mark.parametrize(
  "model, layer, message",
  [
    (ScanModel(), "rnn/proj", "lifted transformation"),
    (VmapModel(), "per_position", "lifted transformation"),
    (VmapStacked(), "stacked", "maps or stacks over it"),
  ],
)
def test_lifted_transform_raises_naming_the_layer(model, layer, message):
  x = jnp.ones((2, 5, 3))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  t = jnp.zeros((2, 5), jnp.int32)
  vgs = stats_helper(model, fisher="empirical")
  with pytest.raises(ValueError, match=f"layer '{layer}'.*{message}"):
    vgs(params, x, t)


def test_weights_mask_drops_examples(x64):
  model, b = MLP(), 6
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets("softmax_cross_entropy", jax.random.key(2), (b, 4))
  mask = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  keep = np.flatnonzero(mask)
  vgs = jax.jit(stats_helper(model, fisher="empirical"))
  loss, grads, stats = vgs(params, x, t, weights=mask)
  loss_k, grads_k, stats_k = vgs(params, x[keep], t[keep])
  np.testing.assert_allclose(loss, loss_k, rtol=1e-12)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, grads_k)
  for path in stats:
    g, g_k = stats[path].output_grads, stats_k[path].output_grads
    np.testing.assert_allclose(g[mask == 0], 0.0)
    # G = g^T g / examples is the same as for the batch of kept examples alone.
    np.testing.assert_allclose(g.T @ g / b, g_k.T @ g_k / len(keep), atol=1e-12)


def test_weights_general(x64):
  """Weighted-mean loss and gradient; G is the weighted mean of per-example outer products."""
  model, b = MLP(), 5
  x = jax.random.normal(jax.random.key(0), (b, 3), F64)
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  t = make_targets("squared_error", jax.random.key(2), (b, 4))
  w = jnp.array([0.5, 2.0, 0.0, 1.0, 3.0])
  vgs = jax.jit(stats_helper(model, loss="squared_error", fisher="empirical"))
  loss, grads, stats = vgs(params, x, t, weights=w)
  _, _, stats_1 = vgs(params, x, t)  # unweighted: per-example gradients
  wmean = lambda p: jnp.sum(w * per_example_loss("squared_error", model.apply({"params": p}, x), t))
  np.testing.assert_allclose(loss, wmean(params) / w.sum(), rtol=1e-12)
  ref = jax.grad(lambda p: wmean(p) / w.sum())(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, ref)
  for path in stats:
    g, g1 = stats[path].output_grads, stats_1[path].output_grads
    expected = jnp.einsum("b,bi,bj->ij", w, g1, g1) / w.sum()
    np.testing.assert_allclose(g.T @ g / b, expected, atol=1e-12)


def test_train_state_apply_gradients_passes_extra_to_update():
  """``TrainState.apply_gradients(grads=..., **extra)`` is ``tx.update(..., **extra)``: all of
  ``extra``, as ``cgfac()``'s quadratic model needs (Flax's own ``apply_gradients`` drops it)."""
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (8, 4))
  t = jnp.arange(8) % 3
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  tx = cgfac.cgfac()
  state = cflax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  assert state.collections == {}
  fn = cflax.value_grad_and_extra(model)

  @jax.jit
  def both(state, key):
    _, grads, extra = fn(state.params, x, t, key)
    assert "collections" not in extra  # none given, none returned
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    return state.apply_gradients(grads=grads, **extra), (updates, opt_state), grads

  new, (updates, opt_state), grads = both(state, jax.random.key(2))
  assert int(new.step) == 1
  close = lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  jax.tree.map(close, new.params, optax.apply_updates(params, updates))
  jax.tree.map(close, new.opt_state, opt_state)
  assert float(new.opt_state[0].coefficients[0]) != 0.0  # the quadratic model's step size
  with pytest.raises(ValueError, match="layer_stats"):
    train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx).apply_gradients(
      grads=grads
    )
  with pytest.raises(TypeError, match="params= or variables=, exactly one"):
    cflax.TrainState.create(apply_fn=model.apply, tx=tx)
  with pytest.raises(TypeError, match="params= or variables=, exactly one"):
    cflax.TrainState.create(apply_fn=model.apply, tx=tx, params=params, variables={})


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6, param_dtype=F64)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5, param_dtype=F64)(x)
    return nn.Dense(3, param_dtype=F64)(jnp.tanh(x))


def test_collections_are_updated_as_a_mutable_apply_updates_them(x64):
  model, b = BatchNormNet(), 6
  x = jax.random.normal(jax.random.key(0), (b, 4), F64)
  t = jnp.arange(b) % 3
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(1), x, train=False)
  tx = cgfac.cgfac(learning_rate=0.1)
  state = cflax.TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
  assert set(state.collections) == {"batch_stats"} and "batch_stats" not in state.params
  fn = cflax.value_grad_and_extra(model, fisher="empirical")

  @functools.partial(jax.jit, static_argnames="train")
  def step(state, train):
    """The helper and TrainState; and the reference: a value_and_grad of a mutable apply."""
    loss, grads, extra = fn(state.params, x, t, collections=state.collections, train=train)
    new = state.apply_gradients(grads=grads, **extra)

    def reference(p):
      out, changed = model.apply(
        {"params": p, **state.collections}, x, train=train, mutable=["batch_stats"]
      )
      return per_example_loss("softmax_cross_entropy", out, t).mean(), changed

    (ref_loss, changed), ref_grads = jax.value_and_grad(reference, has_aux=True)(state.params)
    return (loss, grads, extra["collections"], new.collections), (ref_loss, ref_grads, changed)

  for train in (True, False):
    (loss, grads, collections, stored), (ref_loss, ref_grads, changed) = step(state, train)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-12), grads, ref_grads)
    assert set(changed) == {"batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, collections, changed)
    moved = jax.tree.map(lambda u, v: bool(jnp.any(u != v)), changed, state.collections)
    assert any(jax.tree.leaves(moved)) == train  # running averages move in training mode only
    jax.tree.map(np.testing.assert_array_equal, stored, changed)
  # mutable=False: nothing may change (evaluation mode), and nothing does.
  _, _, extra = fn(state.params, x, t, collections=state.collections, mutable=False, train=False)
  jax.tree.map(np.testing.assert_array_equal, extra["collections"], state.collections)
  with pytest.raises(ValueError, match="mutable must be a bool, a collection name or a list"):
    fn(state.params, x, t, collections=state.collections, mutable=[3], train=True)
  with pytest.raises(TypeError, match="collections=, not variables="):
    fn(state.params, x, t, variables=variables, train=True)


def test_errors():
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
  x = jnp.ones((4, 2))
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  labels = jnp.array([0, 1, 2, 0])
  with pytest.raises(ValueError, match="loss must be one of .* got 'hinge'"):
    stats_helper(model, loss="hinge")
  with pytest.raises(ValueError, match="fisher must be one of .* got 'true'"):
    stats_helper(model, fisher="true")
  vgs = stats_helper(model)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    vgs(params, x, labels)
  with pytest.raises(ValueError, match=r"targets of shape \(4,\) .* got \(4, 3\)"):
    vgs(params, x, jnp.zeros((4, 3), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match="integer class labels, got dtype float32"):
    vgs(params, x, labels.astype(jnp.float32), jax.random.key(0))
  with pytest.raises(ValueError, match=r"weights must have shape \(4,\), got \(3,\)"):
    vgs(params, x, labels, jax.random.key(0), weights=jnp.ones(3))

  embed = nn.Sequential([nn.Embed(10, 3), nn.LayerNorm()])
  tokens = jnp.zeros((4, 2), jnp.int32)
  p = jax.jit(embed.init)(jax.random.key(0), tokens)["params"]
  with pytest.raises(
    ValueError,
    match=r"calls no layer .*'nn.Conv', 'nn.Dense', 'nn.DenseGeneral', 'nnx.Conv', 'nnx.Einsum', "
    r"'nnx.Linear', 'nnx.LinearGeneral'",
  ):
    stats_helper(embed, fisher="empirical")(p, tokens, jnp.zeros((4, 2), jnp.int32))

  batched = nn.DenseGeneral(3, batch_dims=(0,))
  xb = jnp.ones((4, 2))
  pb = jax.jit(batched.init)(jax.random.key(0), xb)["params"]
  with pytest.raises(ValueError, match=r"layer '' \(DenseGeneral\): .*batch_dims=\(0,\)"):
    stats_helper(batched, fisher="empirical")(pb, xb, labels)

  wrong_leading = nn.DenseGeneral(3, axis=0)
  pw = jax.jit(wrong_leading.init)(jax.random.key(0), jnp.ones((4, 2)))["params"]
  with pytest.raises(ValueError, match="contracts the leading"):
    stats_helper(wrong_leading, fisher="empirical")(pw, jnp.ones((4, 2)), labels[:2])
