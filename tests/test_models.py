"""Real layers through the Flax capture: convolutions, sequence dense layers, and two models.

Every parameter of a model gets one documented update:

- ``kernel``/``bias`` of ``nn.Dense``, ``nn.DenseGeneral`` (attention projections),
  ``nn.Conv``, ``nnx.Linear``, ``nnx.Conv``: the layer's Kronecker-factored block, solved by
  the solver ``"auto"`` picks (printed below);
- everything else (embeddings, LayerNorm scales and biases, learned positions): the
  ``fallback`` (default ``"diagonal"``: damped diagonal empirical Fisher).
"""

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import cgfac_optax as cgfac
from cgfac_optax import _layers
from cgfac_optax import flax as cflax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402


def stats_helper(model, **kwargs):
  """``fn(params, inputs, targets, ...) -> (loss, grads, stats)`` of the Linen helper."""
  return oracles.with_stats(cflax.value_grad_and_extra(model, **kwargs))


def _per_example_ce(logits, labels):
  """The capture's per-example loss: cross-entropy, averaged over any position axes."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return ce.reshape(ce.shape[0], -1).mean(1)


def _assert_stats_reproduce_per_example_grads(stats, per_example, paths, loss_positions=1):
  """Each example's ``sum_r a_r g_r^T`` is its gradient; with ``P`` positions in the outputs,
  ``g`` carries ``sqrt(P)`` on top (see ``cgfac_optax._capture``)."""
  for path in paths:
    s = _leaf(stats, path)
    kernel = _leaf(per_example, path)["kernel"]
    a = s.inputs.reshape(s.inputs.shape[0], -1, s.inputs.shape[-1])
    g = s.output_grads.reshape(a.shape[0], a.shape[1], -1) / np.sqrt(loss_positions)
    np.testing.assert_allclose(
      jnp.einsum("bri,bro->bio", a, g).reshape(kernel.shape), kernel, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(g.sum(1), _leaf(per_example, path)["bias"], rtol=1e-9, atol=1e-12)


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


class ConvNet(nn.Module):
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = {"param_dtype": self.param_dtype, "precision": "highest"}
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME", **kw)(x))
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="CIRCULAR", kernel_dilation=2, **kw)(x))
    return nn.Dense(5, **kw)(x.reshape(x.shape[0], -1))


@pytest.mark.usefixtures("x64")
def test_linen_conv_capture_reproduces_per_example_gradients():
  x = jax.random.normal(jax.random.key(0), (4, 7, 6, 2))
  y = jnp.array([0, 3, 1, 4])
  model = ConvNet(param_dtype=jnp.float64)
  params = model.init(jax.random.key(1), x)["params"]
  vgs = jax.jit(stats_helper(model, fisher="empirical"))
  _, grads, stats = vgs(params, x, y)
  assert stats["Conv_0"].inputs.shape == (4, 4, 3, 18)  # stride 2, SAME: 4x3 positions
  assert stats["Conv_1"].inputs.shape == (4, 4, 3, 16)  # circular keeps the positions

  def example_loss(p, xj, yj):
    return _per_example_ce(model.apply({"params": p}, xj[None]), yj[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(example_loss), (None, 0, 0)))(params, x, y)
  _assert_stats_reproduce_per_example_grads(stats, per_example, ["Conv_0", "Conv_1", "Dense_0"])
  np.testing.assert_allclose(
    grads["Conv_0"]["kernel"], per_example["Conv_0"]["kernel"].mean(0), rtol=1e-9
  )


@pytest.mark.usefixtures("x64")
def test_captured_1x1_conv_equals_captured_dense_per_position():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5))
  y = jax.random.randint(jax.random.key(1), (2, 3, 4), 0, 3)
  kw = {"param_dtype": jnp.float64, "precision": "highest"}
  conv, dense = nn.Conv(3, (1, 1), **kw), nn.Dense(3, **kw)
  conv_p = conv.init(jax.random.key(2), x)["params"]
  dense_p = {"kernel": conv_p["kernel"][0, 0], "bias": conv_p["bias"]}
  _, conv_g, conv_s = stats_helper(conv, fisher="empirical")(conv_p, x, y)
  _, dense_g, dense_s = stats_helper(dense, fisher="empirical")(dense_p, x, y)
  np.testing.assert_allclose(conv_s.inputs, dense_s.inputs, rtol=1e-12)
  np.testing.assert_allclose(conv_s.output_grads, dense_s.output_grads, rtol=1e-12)
  tx = cgfac.scale_by_cgfac(0.05, solver="lowrank")
  conv_u, _ = tx.update(conv_g, tx.init(conv_p), layer_stats=conv_s)
  dense_u, _ = tx.update(dense_g, tx.init(dense_p), layer_stats=dense_s)
  np.testing.assert_allclose(conv_u["kernel"][0, 0], dense_u["kernel"], rtol=1e-10)
  np.testing.assert_allclose(conv_u["bias"], dense_u["bias"], rtol=1e-10)


class NNXConvNet(nnx.Module):
  def __init__(self, rngs):
    kw = {"param_dtype": jnp.float64, "precision": "highest", "rngs": rngs}
    self.conv = nnx.Conv(2, 4, (3, 3), strides=(2, 1), padding="VALID", **kw)
    self.head = nnx.Linear(4 * 4 * 4, 5, **kw)

  def __call__(self, x):
    h = jnp.tanh(self.conv(x))
    return self.head(h.reshape(h.shape[0], -1))


@pytest.mark.usefixtures("x64")
def test_nnx_conv_capture_reproduces_per_example_gradients():
  x = jax.random.normal(jax.random.key(0), (3, 9, 6, 2))
  y = jnp.array([1, 0, 4])
  model = NNXConvNet(nnx.Rngs(0))
  _, grads, stats = oracles.with_stats(cflax.nnx_value_grad_and_extra)(
    model, x, y, fisher="empirical"
  )
  graphdef, params = nnx.split(model, nnx.Param)

  def example_loss(p, xj, yj):
    return _per_example_ce(nnx.merge(graphdef, p)(xj[None]), yj[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(example_loss), (None, 0, 0)))(params, x, y)
  per_example = nnx.to_pure_dict(per_example)
  _assert_stats_reproduce_per_example_grads(stats, per_example, ["conv", "head"])


class TokenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    kw = {"param_dtype": jnp.float64, "precision": "highest"}
    h = jnp.tanh(nn.Dense(4, name="hidden", **kw)(x))
    return nn.Dense(3, name="out", **kw)(h)


@pytest.mark.usefixtures("x64")
def test_sequence_dense_capture_reproduces_per_example_gradients_summed_over_tokens():
  """Rows are the B*T tokens; each example's gradient is the sum of its tokens' ``a g^T``.

  The per-example loss averages the T token losses, so its gradient is ``1/T`` of that of
  kfac-jax's summed loss; the capture's ``g`` is ``sqrt(T)`` times it, so that ``G`` is ``1/T``
  of kfac-jax's: the curvature of a loss ``T`` times smaller (``tests/test_sequence.py`` checks
  it against the loss's exact Fisher), with a damping that means ``T`` times more.
  """
  b, t = 3, 5
  x = jax.random.normal(jax.random.key(0), (b, t, 2))
  y = jax.random.randint(jax.random.key(1), (b, t), 0, 3)
  model = TokenMLP()
  params = model.init(jax.random.key(2), x)["params"]
  _, grads, stats = jax.jit(stats_helper(model, fisher="empirical"))(params, x, y)
  assert stats["hidden"].inputs.shape == (b, t, 2)
  assert stats["out"].output_grads.shape == (b, t, 3)

  def example_loss(p, xj, yj):
    return _per_example_ce(model.apply({"params": p}, xj[None]), yj[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(example_loss), (None, 0, 0)))(params, x, y)
  _assert_stats_reproduce_per_example_grads(stats, per_example, ["hidden", "out"], t)


# -- training: a CNN on digits and a transformer block on a toy sequence task ----------------


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(jnp.tanh(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.avg_pool(jnp.tanh(nn.Conv(16, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
  """Embedding + learned positions, pre-LayerNorm attention and MLP, final LayerNorm, head."""

  vocab: int = 8
  width: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width)(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.5), (tokens.shape[1], self.width))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def _train(model, x, y, tx, steps, batch):
  params = model.init(jax.random.key(0), x[:2])["params"]
  fn = cflax.value_grad_and_extra(model)
  state = tx.init(params)

  @jax.jit
  def step(params, state, xb, yb, rng):
    loss, grads, extra = fn(params, xb, yb, rng)
    stats = extra["layer_stats"]()  # returned for the plan; update takes the stats or the function
    updates, state = tx.update(grads, state, params, **{**extra, "layer_stats": stats})
    return optax.apply_updates(params, updates), state, loss, stats

  rng = np.random.default_rng(0)
  losses = []
  start = params
  for i in range(steps):
    idx = rng.choice(len(x), batch, replace=False)
    params, state, loss, stats = step(params, state, x[idx], y[idx], jax.random.key(i))
    losses.append(float(loss))
  print(cgfac.plan(params, stats))
  return start, params, stats, losses


def _changed(before, after):
  return {
    _layers.path_str(p): bool(jnp.any(a != b))
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))
  }


@pytest.mark.slow
def test_cnn_trains_on_digits_with_every_parameter_in_a_kronecker_block():
  digits = load_digits()
  x = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target)
  model = CNN()
  # fallback="error": no parameter is left to a fallback; every one is in a conv/dense block.
  tx = cgfac.cgfac(0.3, 0.1, solver="auto", fallback="error")
  start, params, stats, losses = _train(model, x[:1500], y[:1500], tx, steps=60, batch=128)
  plan = cgfac.plan(params, stats, learning_rate=0.3)
  assert plan["Conv_0"].rows == 128 * 64 and not plan["Conv_0"].matrix_free
  assert all(_changed(start, params).values())
  assert np.mean(losses[:3]) > 2.0 and np.mean(losses[-5:]) < 0.5
  accuracy = jnp.mean(jnp.argmax(model.apply({"params": params}, x[1500:]), -1) == y[1500:])
  assert accuracy > 0.75


@pytest.mark.slow
def test_transformer_block_trains_on_a_toy_sequence_task():
  """Predict the previous token (position 0: the last one): attention and positions are needed."""
  vocab, length = 8, 8
  tokens = jax.random.randint(jax.random.key(0), (4096, length), 0, vocab)
  targets = jnp.roll(tokens, 1, axis=1)
  model = Block(vocab=vocab)
  tx = cgfac.cgfac(0.03, 0.1, solver="auto")  # default fallback: "diagonal"
  start, params, stats, losses = _train(model, tokens[:3500], targets[:3500], tx, 40, 32)
  covered = {f"{p}/{leaf}" for p in _layers.flatten_stats(stats) for leaf in ("kernel", "bias")}
  fallback = {p for p in _changed(start, params) if p not in covered}
  assert fallback == {
    "Embed_0/embedding",
    "pos",
    *(f"LayerNorm_{i}/{leaf}" for i in range(3) for leaf in ("scale", "bias")),
  }
  assert {p.split("/")[-2] for p in covered if "Attention" in p} == {"query", "key", "value", "out"}
  assert all(_changed(start, params).values())
  assert np.mean(losses[:3]) > 2.0 and np.mean(losses[-5:]) < 0.1
  predictions = jnp.argmax(model.apply({"params": params}, tokens[3500:]), -1)
  assert jnp.mean(predictions == targets[3500:]) > 0.95
