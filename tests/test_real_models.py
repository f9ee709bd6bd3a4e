"""Models of the kinds Flax's examples train, through the helpers as a user would call them.

A Linen ResNet (BatchNorm, strided convolutions, a projection shortcut, global average pool), a
Linen CNN of the MNIST kind, an NNX CNN whose dropout draws from the ``rngs`` of its call, an NNX
model whose dropout holds its own RNG stream next to BatchNorm, and an NNX model built on
``nnx.MultiHeadAttention``, all tiny. For each:

- training, in both modes (``cgfac()``: step sizes from the quadratic model, which reads all of
  ``extra``; ``cgfac(learning_rate=...)``): the loss goes down, nothing compiles after the first
  step, and the first step leaves the batch statistics and RNG counts where one step of Adam with
  ``jax.value_and_grad(..., has_aux=True)`` and ``mutable=["batch_stats"]`` (Linen) or
  ``nnx.value_and_grad`` (NNX) leaves them;
- the stats against independent oracles: without coupling between the examples (BatchNorm in
  evaluation mode, dropout off), each example's ``a_j g_j^T`` is its own gradient
  (``jax.vmap(jax.grad(...))``); with it (BatchNorm normalizing with the batch's statistics,
  dropout with fixed RNGs), the empirical stats of the whole batch sum to the batch gradient:
  ``sum_j a_j g_j^T / B`` (summed over positions) is each kernel's gradient, ``sum_j g_j / B``
  each bias's.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cgfac_optax as cgfac
from cgfac_optax import flax as cflax

F32, F64 = jnp.float32, jnp.float64
B = 16  # examples per batch
STEPS = 12
# The two modes: step sizes from the quadratic model, and a fixed learning rate.
MODES = {
  "cgfac()": lambda: cgfac.cgfac(),
  "cgfac(learning_rate)": lambda: cgfac.cgfac(learning_rate=0.2, damping=0.1, max_iters=5),
}


def ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def data(shape, classes, dtype=F32):
  """``B`` inputs of ``shape`` and labels from a random linear teacher (learnable)."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (B, *shape), dtype)
  flat = x.reshape(B, -1)
  return x, jnp.argmax(flat @ jax.random.normal(kw, (flat.shape[1], classes), dtype), axis=-1)


# The models.


class ResidualBlock(nn.Module):
  features: int
  strides: int = 1
  param_dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, param_dtype=self.param_dtype)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, param_dtype=self.param_dtype
    )
    y = nn.relu(norm()(conv(self.features, (3, 3), self.strides)(x)))
    y = norm()(conv(self.features, (3, 3))(y))
    if x.shape != y.shape:  # a projection shortcut: 1x1, with the block's stride
      x = norm(name="shortcut_norm")(conv(self.features, (1, 1), self.strides, name="shortcut")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  classes: int = 5
  param_dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(4, (3, 3), use_bias=False, param_dtype=self.param_dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, param_dtype=self.param_dtype)(x)
    x = nn.relu(x)
    x = ResidualBlock(4, param_dtype=self.param_dtype)(x, train)
    x = ResidualBlock(8, strides=2, param_dtype=self.param_dtype)(x, train)
    return nn.Dense(self.classes, param_dtype=self.param_dtype)(jnp.mean(x, axis=(1, 2)))


class DigitsCNN(nn.Module):
  """Two convolutions with pooling and a dense head, as for MNIST (on 8x8 images here)."""

  param_dtype: jnp.dtype = F32

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(6, (3, 3), param_dtype=self.param_dtype)(x)), (2, 2), (2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3), param_dtype=self.param_dtype)(x)), (2, 2), (2, 2))
    x = nn.relu(nn.Dense(16, param_dtype=self.param_dtype)(x.reshape(x.shape[0], -1)))
    return nn.Dense(5, param_dtype=self.param_dtype)(x)


class DropoutCNN(nnx.Module):
  """Dropout that draws from the call's ``rngs``: ``model(x, rngs=rngs)``."""

  def __init__(self, rngs, dtype=F32):
    self.conv1 = nnx.Conv(1, 6, (3, 3), param_dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(6, 8, (3, 3), param_dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(0.25)
    self.hidden = nnx.Linear(8 * 2 * 2, 16, param_dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(16, 5, param_dtype=dtype, rngs=rngs)

  def __call__(self, x, *, rngs=None):
    x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))), rngs=rngs)
    return self.head(x)


class NormDropoutNet(nnx.Module):
  """BatchNorm, and dropout holding its own RNG stream: state that every forward pass changes."""

  def __init__(self, rngs, dtype=F32):
    self.conv = nnx.Conv(1, 6, (3, 3), strides=(2, 2), param_dtype=dtype, rngs=rngs)
    self.norm = nnx.BatchNorm(6, momentum=0.9, param_dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(6 * 4 * 4, 5, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = self.dropout(nnx.relu(self.norm(self.conv(x))))
    return self.head(h.reshape(h.shape[0], -1))


class AttentionNet(nnx.Module):
  """Token features embedded, self-attention with a residual, LayerNorm, mean pool, head."""

  def __init__(self, rngs, dtype=F32):
    self.embed = nnx.Linear(3, 8, param_dtype=dtype, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=8, decode=False, param_dtype=dtype, rngs=rngs
    )
    self.norm = nnx.LayerNorm(8, param_dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(8, 4, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.embed(x))
    h = self.norm(h + self.attention(h))
    return self.head(h.mean(1))


# Each model: how to build it, its inputs, what its call takes in training.


def resnet(dtype=F32):
  model = ResNet(param_dtype=dtype)
  x, y = data((8, 8, 3), 5, dtype)
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(1), x, train=False)
  return model, variables, x, y


def digits_cnn(dtype=F32):
  model = DigitsCNN(param_dtype=dtype)
  x, y = data((8, 8, 1), 5, dtype)
  return model, jax.jit(model.init)(jax.random.key(1), x), x, y


NNX_MODELS = {
  # name: (class, input shape, classes, dropout drawn from the call's rngs)
  "dropout_cnn": (DropoutCNN, (8, 8, 1), 5, True),
  "norm_dropout": (NormDropoutNet, (8, 8, 1), 5, False),
  "attention": (AttentionNet, (5, 3), 4, False),
}


def nnx_model(name, dtype=F32):
  cls, shape, classes, call_rngs = NNX_MODELS[name]
  x, y = data(shape, classes, dtype)
  return cls(nnx.Rngs(0, dropout=1), dtype), x, y, call_rngs


# Training.


def run_steps(caplog, step, steps=STEPS):
  """``[step(i) for i in range(steps)]`` as floats; fails if anything compiles after step 0."""
  with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):
    losses = [float(step(0))]
    compiled = lambda: [r.getMessage() for r in caplog.records if re.search("ompil", r.message)]
    assert compiled(), "the first step's compilation should be logged"
    caplog.clear()
    losses += [float(step(i)) for i in range(1, steps)]
    assert not compiled(), compiled()
  return losses


def assert_trains(losses):
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


def same(u, v):
  """Equal arrays (PRNG keys by their data), bit for bit."""
  data = lambda w: jax.random.key_data(w) if jnp.issubdtype(w.dtype, jax.dtypes.prng_key) else w
  np.testing.assert_array_equal(data(u), data(v))


@pytest.mark.slow  # compiling cgfac()'s step for the ResNet: about 15 s of CPU
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("build", [resnet, digits_cnn], ids=["resnet", "digits_cnn"])
def test_linen_trains(caplog, build, mode):
  model, variables, x, y = build()
  kwargs = {"train": True} if build is resnet else {}
  state = cflax.TrainState.create(apply_fn=model.apply, variables=variables, tx=MODES[mode]())
  fn = cflax.value_grad_and_extra(model)
  keys = list(jax.random.split(jax.random.key(2), STEPS))

  @jax.jit
  def step(state, key):
    loss, grads, extra = fn(state.params, x, y, key, collections=state.collections, **kwargs)
    return state.apply_gradients(grads=grads, **extra), loss

  def adam_step(state):
    """One step of Adam on the same batch, batch statistics as Flax's examples update them."""

    def loss_fn(p):
      out, changed = model.apply(
        {"params": p, **state.collections}, x, mutable=["batch_stats"], **kwargs
      )
      return ce(out, y).mean(), changed

    (loss, changed), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads).replace(collections={**state.collections, **changed})
    return state, loss

  first = state

  def one(i):
    nonlocal state
    state, loss = step(state, keys[i])
    return loss

  losses = run_steps(caplog, one)
  assert_trains(losses)
  adam = jax.jit(adam_step)(
    first.replace(tx=optax.adam(1e-3), opt_state=optax.adam(1e-3).init(first.params))
  )
  np.testing.assert_allclose(losses[0], adam[1], rtol=1e-6)
  after_one = step(first, keys[0])[0]
  assert set(after_one.collections) == ({"batch_stats"} if build is resnet else set())
  jax.tree.map(same, after_one.collections, adam[0].collections)
  if build is resnet:  # the running averages did move, and keep moving
    moved = jax.tree.map(
      lambda u, v: bool(jnp.any(u != v)), after_one.collections, first.collections
    )
    assert all(jax.tree.leaves(moved))
    assert not np.allclose(state.collections["batch_stats"]["BatchNorm_0"]["mean"], 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", NNX_MODELS)
def test_nnx_trains(caplog, name, mode):
  model, x, y, call_rngs = nnx_model(name)
  reference = nnx.clone(model)
  rngs, ref_rngs = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
  kwargs = lambda r: {"rngs": r} if call_rngs else {}
  optimizer = nnx.Optimizer(model, MODES[mode](), wrt=nnx.Param)
  keys = list(jax.random.split(jax.random.key(2), STEPS))

  @nnx.jit
  def step(model, optimizer, rngs, key):
    loss, grads, extra = cflax.nnx_value_grad_and_extra(model, x, y, key, **kwargs(rngs))
    optimizer.update(model, grads, **extra)
    return loss

  @nnx.jit
  def adam_step(model, optimizer, rngs):
    loss_fn = lambda m, r: ce(m(x, **kwargs(r)), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
    optimizer.update(model, grads)
    return loss

  # The values of everything but the params: batch statistics, RNG keys and counts.
  state = lambda m, r: nnx.to_pure_dict(nnx.state((m, r), nnx.Not(nnx.Param)))
  after_one = []

  def one(i):
    loss = step(model, optimizer, rngs, keys[i])
    if i == 0:
      after_one.append(state(model, rngs))
    return loss

  losses = run_steps(caplog, one)
  assert_trains(losses)
  adam = nnx.Optimizer(reference, optax.adam(1e-3), wrt=nnx.Param)
  np.testing.assert_allclose(losses[0], adam_step(reference, adam, ref_rngs), rtol=1e-6)
  # Batch statistics and RNG counts (the model's and the call's): as the Adam step left them.
  jax.tree.map(same, after_one[0], state(reference, ref_rngs))
  if name == "norm_dropout":
    assert int(model.dropout.rngs.count[...]) == STEPS  # one draw per step: the loss pass's
  if call_rngs:
    assert int(rngs.dropout.count[...]) == STEPS


# Stats oracles (float64).


def flat(tree):
  """``{"a/b": leaf}`` of a nested dict (an ``nnx.State`` as its pure dict)."""
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda v: isinstance(v, cgfac.DenseStats)
  )[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): v for path, v in leaves}


def per_example_products(s):
  """Each example's ``a_j g_j^T`` summed over positions, and ``g_j`` summed: (B, d_in, d_out)."""
  a = s.inputs.reshape(s.inputs.shape[0], -1, s.inputs.shape[-1])
  g = s.output_grads.reshape(a.shape[0], a.shape[1], -1)
  return jnp.einsum("bti,bto->bio", a, g), g.sum(1)


def check_per_example(stats, per_example, tol=lambda path: (1e-9, 1e-12)):
  """Each example's ``a_j g_j^T`` is its own kernel gradient (and ``g_j`` its bias's)."""
  grads = flat(per_example)
  for path, s in flat(stats).items():
    kernel, bias = per_example_products(s)
    rtol, atol = tol(path)
    want = grads[f"{path}/kernel"]
    np.testing.assert_allclose(kernel.reshape(want.shape), want, rtol=rtol, atol=atol, err_msg=path)
    if f"{path}/bias" in grads:
      want = grads[f"{path}/bias"]
      np.testing.assert_allclose(bias.reshape(want.shape), want, rtol=rtol, atol=atol)


def check_batch_gradient(stats, grads, examples):
  """``sum_j a_j g_j^T / B`` is each kernel's batch gradient, ``sum_j g_j / B`` each bias's."""
  grads = flat(grads)
  for path, s in flat(stats).items():
    kernel, bias = per_example_products(s)
    want = grads[f"{path}/kernel"]
    got = kernel.sum(0).reshape(want.shape) / examples
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=path)
    if f"{path}/bias" in grads:
      want = grads[f"{path}/bias"]
      np.testing.assert_allclose(bias.sum(0).reshape(want.shape) / examples, want, atol=1e-12)


def linen_stats(model, params, x, y, **kwargs):
  """The helper's ``(grads, stats)``: empirical Fisher, every example."""
  fn = cflax.value_grad_and_extra(model, fisher="empirical", curvature_batch_size=None)

  @jax.jit
  def run(params, x, y):
    _, grads, extra = fn(params, x, y, **kwargs)
    return grads, extra["layer_stats"]()

  return run(params, x, y)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("build", [resnet, digits_cnn], ids=["resnet", "digits_cnn"])
def test_linen_stats_are_per_example_gradients_without_coupling(build):
  model, variables, x, y = build(F64)
  params, collections = variables["params"], {k: v for k, v in variables.items() if k != "params"}
  kwargs = {"train": False} if build is resnet else {}
  # Running averages that are not the identity, as after some training.
  collections = jax.tree.map(lambda v: v + 0.3, collections)
  _, stats = linen_stats(model, params, x, y, collections=collections, **kwargs)

  def one(p, xj, yj):
    return ce(model.apply({"params": p, **collections}, xj[None], **kwargs), yj[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))(params, x, y)
  captured = set(flat(stats))
  assert {"Conv_0", "Dense_0"} <= captured
  if build is resnet:
    assert {"ResidualBlock_1/shortcut", "ResidualBlock_1/Conv_0"} <= captured
  check_per_example(stats, per_example)


@pytest.mark.usefixtures("x64")
def test_linen_resnet_stats_in_training_mode_sum_to_the_batch_gradient():
  model, variables, x, y = resnet(F64)
  params, collections = variables["params"], {"batch_stats": variables["batch_stats"]}
  grads, stats = linen_stats(model, params, x, y, collections=collections, train=True)
  check_batch_gradient(stats, grads, B)
  # The examples are coupled: the rows are not the per-example gradients.
  _, eval_stats = linen_stats(model, params, x, y, collections=collections, train=False)
  conv = flat(stats)["ResidualBlock_0/Conv_0"]
  assert not np.allclose(conv.output_grads, flat(eval_stats)["ResidualBlock_0/Conv_0"].output_grads)


def nnx_stats(model, x, y, **kwargs):
  """The helper's ``(grads, stats)``: empirical Fisher, every example."""
  _, grads, extra = cflax.nnx_value_grad_and_extra(
    model, x, y, fisher="empirical", curvature_batch_size=None, **kwargs
  )
  return grads, extra["layer_stats"]()


# What each NNX model's evaluation mode sets.
EVAL = {
  "dropout_cnn": {"deterministic": True},
  "norm_dropout": {"deterministic": True, "use_running_average": True},
  "attention": {"deterministic": True},
}


def attention_tolerance(path):
  # Query and key reach the loss through the softmax, whose per-example and batched evaluations
  # agree to about 1e-8 only (see tests/test_flax_nnx.py); the other layers to rounding.
  return (1e-4, 5e-8) if path.split("/")[-1] in ("query", "key") else (1e-9, 1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", NNX_MODELS)
def test_nnx_stats_are_per_example_gradients_without_coupling(name):
  model, x, y, _ = nnx_model(name, F64)
  model = nnx.view(model, **EVAL[name])
  grads, stats = nnx.jit(nnx_stats)(model, x, y)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def one(p, xj, yj):
    return ce(nnx.merge(graphdef, p, rest)(xj[None]), yj[None])[0]

  per_example = jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))(params, x, y)
  layers = {"dropout_cnn": 4, "norm_dropout": 2, "attention": 6}[name]
  assert len(flat(stats)) == layers
  check_per_example(stats, per_example, attention_tolerance)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ["dropout_cnn", "norm_dropout"])
def test_nnx_stats_in_training_mode_sum_to_the_batch_gradient(name):
  model, x, y, call_rngs = nnx_model(name, F64)
  kwargs = {"rngs": nnx.Rngs(dropout=3)} if call_rngs else {}
  grads, stats = nnx.jit(nnx_stats)(model, x, y, **kwargs)
  check_batch_gradient(stats, grads, B)
  # Dropout did drop: more of the head's inputs are zero than in evaluation mode.
  _, eval_stats = nnx.jit(nnx_stats)(nnx.view(model, **EVAL[name]), x, y)
  zeros = lambda s: float(jnp.mean(flat(s)["head"].inputs == 0))
  assert zeros(stats) > zeros(eval_stats) + 0.1
