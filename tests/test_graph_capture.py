"""The plain-JAX front end (``cgfac_optax.value_grad_and_extra``) against hand-written references.

Every model is written once, with a *tap* at each layer's product: the plain model's tap does
nothing, so ``apply_fn`` is the model as a user writes it; the reference tap records the layer's
input rows computed by hand (patches by loops for a convolution) and adds a perturbation to the
product's output. The per-example output gradients of the reference are the gradients of each
example's own loss (``jax.vmap(jax.grad(...))`` over examples) with respect to its perturbations.
From those, independently of the library: each example's kernel gradient, and the empirical
Fisher's Kronecker factors ``A = a^T a / rows`` and ``G = g^T g / B``.
"""

import pathlib
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import cgfac_optax as cgfac
from cgfac_optax import _layers as cgfac_layers
from cgfac_optax import flax as cflax

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

F64 = jnp.float64


class Tap:
  """The reference capture: each product's hand-made rows (thunks) and a perturbation added to
  its output, per use of the layer."""

  def __init__(self, eps=None):
    self.eps, self.rows, self.shapes = eps, {}, {}

  def __call__(self, name, rows, y):
    index = len(self.rows.setdefault(name, []))
    self.rows[name].append(rows)
    self.shapes.setdefault(name, []).append(y.shape)
    return y if self.eps is None else y + self.eps[name][index]


def plain(name, rows, y):
  del name, rows
  return y


# The models.


def mlp(params, x, tap=plain):
  p = params
  h = jnp.tanh(tap("hidden", lambda: x, x @ p["hidden"]["kernel"]) + p["hidden"]["bias"])
  return tap("out", lambda: h, h @ p["out"]["kernel"]) + p["out"]["bias"]


def shared(params, x, tap=plain):
  """One square layer applied twice (weight sharing), then a head."""
  p, h = params, x
  for _ in range(2):
    h = jnp.tanh(tap("shared", lambda h=h: h, h @ p["shared"]["kernel"]) + p["shared"]["bias"])
  return tap("head", lambda: h, h @ p["head"]["kernel"]) + p["head"]["bias"]


DN = ("NHWC", "HWIO", "NHWC")
CONV1 = {"window_strides": (2, 2), "padding": "SAME"}
CONV2 = {"window_strides": (1, 2), "padding": ((1, 0), (0, 1)), "rhs_dilation": (2, 1)}


def explicit_patches(x, kernel_shape, window_strides, padding, rhs_dilation=(1, 1)):
  """Receptive fields by loops over output positions: ``(B, Ho, Wo, kh kw c)``."""
  x = np.asarray(x)
  (kh, kw), (sh, sw), (dh, dw) = kernel_shape[:2], window_strides, rhs_dilation
  if padding == "SAME":
    padding = []
    for size, k, s, d in ((x.shape[1], kh, sh, dh), (x.shape[2], kw, sw, dw)):
      total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
      padding.append((total // 2, total - total // 2))
  xp = np.pad(x, [(0, 0), *padding, (0, 0)])
  ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
  out = np.zeros((x.shape[0], ho, wo, kh, kw, x.shape[3]))
  for i in range(ho):
    for j in range(wo):
      for u in range(kh):
        for v in range(kw):
          out[:, i, j, u, v] = xp[:, i * sh + u * dh, j * sw + v * dw]
  return out.reshape(x.shape[0], ho, wo, -1)


def cnn(params, x, tap=plain):
  p = params
  for name, options, act in (("conv1", CONV1, jax.nn.relu), ("conv2", CONV2, jnp.tanh)):
    kernel = p[name]["kernel"]
    y = lax.conv_general_dilated(x, kernel, dimension_numbers=DN, **options)
    rows = lambda x=x, kernel=kernel, options=options: explicit_patches(x, kernel.shape, **options)
    x = act(tap(name, rows, y) + p[name]["bias"])
  h = x.mean((1, 2))
  return tap("head", lambda: h, h @ p["head"]["kernel"]) + p["head"]["bias"]


def attention(params, x, tap=plain):
  """One self-attention block: Q/K/V/O projections by einsum, softmax attention, a head."""
  p = params

  def project(name, spec, v, rows):
    return tap(name, rows, jnp.einsum(spec, v, p[name]["kernel"])) + p[name]["bias"]

  q = project("query", "btd,dhk->bthk", x, lambda: x)
  # The activation's contracted axes need not be last, nor in the kernel's order.
  k = project("key", "bdt,dhk->bthk", jnp.swapaxes(x, 1, 2), lambda: x)
  v = project("value", "btd,dhk->bthk", x, lambda: x)
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1])
  o = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)
  rows = lambda: o.reshape(*o.shape[:2], -1)
  y = project("out", "btkh,hkd->btd", jnp.swapaxes(o, 2, 3), rows)
  h = jax.nn.gelu(y + x)
  return tap("head", lambda: h, h @ p["head"]["kernel"]) + p["head"]["bias"]


def _init(shapes, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda shape, scale: jnp.asarray(scale * rng.normal(size=shape), F64)
  return {
    name: {"kernel": normal(k, 0.5), "bias": normal(b, 0.1)} for name, (k, b) in shapes.items()
  }


def _problem(name):
  """``(apply_fn, params, inputs, targets)`` of a test model, float64 (under the x64 fixture)."""
  rng = np.random.default_rng(1)
  data = lambda *shape: jnp.asarray(rng.normal(size=shape), F64)
  labels = lambda classes, *shape: jnp.asarray(rng.integers(0, classes, size=shape))
  if name == "mlp":
    params = _init({"hidden": ((5, 8), (8,)), "out": ((8, 3), (3,))})
    return mlp, params, data(6, 5), labels(3, 6)
  if name == "shared":
    params = _init({"shared": ((4, 4), (4,)), "head": ((4, 3), (3,))})
    return shared, params, data(5, 4), labels(3, 5)
  if name == "cnn":
    shapes = {"conv1": ((3, 3, 2, 4), (4,)), "conv2": ((2, 2, 4, 3), (3,)), "head": ((3, 3), (3,))}
    return cnn, _init(shapes), data(3, 7, 6, 2), labels(3, 3)
  shapes = {n: ((6, 2, 3), (2, 3)) for n in ("query", "key", "value")}
  params = _init({**shapes, "out": ((2, 3, 6), (6,)), "head": ((6, 4), (4,))})
  return attention, params, data(3, 5, 6), labels(4, 3, 5)


MODELS = ["mlp", "shared", "cnn", "attention"]


def per_example_loss(outputs, targets):
  """Softmax cross-entropy of each example, averaged over its positions."""
  losses = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
  return losses.reshape(outputs.shape[0], -1).mean(1)


def loss_positions(apply_fn, params, x) -> int:
  """Positions per example in the outputs; the capture scales ``g`` by their square root."""
  out = jax.eval_shape(apply_fn, params, x)
  return out.size // (out.shape[0] * out.shape[-1])


def per_example_grads(apply_fn, params, x, t):
  loss = lambda p, xj, tj: per_example_loss(apply_fn(p, xj[None]), tj[None])[0]
  return jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(params, x, t)


def reference_rows(apply_fn, params, x, t):
  """Per layer, by hand: the rows ``a`` and the per-example output gradients ``g`` of each use."""
  tap = Tap()
  apply_fn(params, x, tap)
  rows = {n: [np.asarray(r()) for r in thunks] for n, thunks in tap.rows.items()}
  zeros = {n: [jnp.zeros((1, *s[1:]), F64) for s in shapes] for n, shapes in tap.shapes.items()}

  def loss(eps, xj, tj):
    return per_example_loss(apply_fn(params, xj[None], Tap(eps)), tj[None])[0]

  grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(zeros, x, t)
  return rows, {n: [np.asarray(g[:, 0]) for g in gs] for n, gs in grads.items()}


def run(fn, params, x, t, key=None, **kwargs):
  """``(loss, grads, layer stats)`` of ``fn`` in one jitted call."""

  @jax.jit
  def go(params, x, t, key):
    loss, grads, extra = fn(params, x, t, key, **kwargs)
    return loss, grads, extra["layer_stats"]()

  return go(params, x, t, key)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", MODELS)
def test_rows_give_each_examples_gradient(name):
  """Per example, ``sum_positions a g^T`` is its kernel gradient and ``sum g`` its bias gradient
  (``g`` over the square root of the outputs' positions); their means are the batch gradient."""
  apply_fn, params, x, t = _problem(name)
  root = np.sqrt(loss_positions(apply_fn, params, x))
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="empirical")
  loss, grads, stats = jax.tree.map(np.asarray, run(fn, params, x, t))
  per_example = jax.tree.map(np.asarray, per_example_grads(apply_fn, params, x, t))
  mean_loss = jax.jit(lambda p, x, t: per_example_loss(apply_fn(p, x), t).mean())
  np.testing.assert_allclose(loss, mean_loss(params, x, t), rtol=1e-12)
  assert set(stats) == set(params)
  b = x.shape[0]
  for layer, s in stats.items():
    a, g = (v.reshape(b, -1, v.shape[-1]) for v in s)
    g = g / root
    kernel = np.einsum("bri,bro->bio", a, g)
    want = per_example[layer]["kernel"].reshape(kernel.shape)
    np.testing.assert_allclose(kernel, want, rtol=1e-9, atol=1e-12)
    bias = g.sum(1)
    np.testing.assert_allclose(bias, per_example[layer]["bias"].reshape(b, -1), atol=1e-12)
    np.testing.assert_allclose(kernel.mean(0), grads[layer]["kernel"].reshape(kernel.shape[1:]))
    np.testing.assert_allclose(bias.mean(0), grads[layer]["bias"].reshape(-1), atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", MODELS)
def test_factors_match_the_explicit_empirical_fisher(name):
  """``A = a^T a / rows`` (with the bias column) and ``G = P g^T g / B`` from the hand-made rows
  and per-example Jacobians, every use of a layer side by side (``P``: positions per example in
  the outputs, whose losses each example's loss averages)."""
  apply_fn, params, x, t = _problem(name)
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="empirical")
  _, _, stats = run(fn, params, x, t)
  rows, grads = reference_rows(apply_fn, params, x, t)
  b = x.shape[0]
  for layer, s in stats.items():
    d_out = params[layer]["bias"].size
    d_in = params[layer]["kernel"].size // d_out
    a = np.concatenate([r.reshape(-1, d_in) for r in rows[layer]])
    a = np.hstack([a, np.ones((a.shape[0], 1))])
    g = np.concatenate([v.reshape(-1, d_out) for v in grads[layer]])
    big_a, big_g = oracles.factors(s.inputs, s.output_grads, bias=True)
    np.testing.assert_allclose(big_a, a.T @ a / a.shape[0], rtol=1e-10, atol=1e-12)
    positions = loss_positions(apply_fn, params, x)
    np.testing.assert_allclose(big_g, positions * g.T @ g / b, rtol=1e-10, atol=1e-12)


def _assert_monte_carlo(samples, analytic):
  """The mean of the samples within 5 standard errors of ``analytic``, elementwise, with the
  error under 10% of the diagonal (so that a wrong scale cannot pass)."""
  mean = samples.mean(0)
  se = samples.std(0) / np.sqrt(samples.shape[0])
  assert np.all(5 * np.diag(se) < 0.1 * np.abs(np.diag(analytic))), (se, analytic)
  np.testing.assert_array_less(np.abs(mean - analytic), 5 * se + 1e-12)


@pytest.mark.usefixtures("x64")
def test_sampled_fisher_matches_output_fisher():
  """Targets drawn from the model: ``E[G] = (1/B) sum_j J_j^T F_j J_j``, with ``F_j = diag(p) -
  p p^T`` the softmax's Fisher and ``J_j`` the Jacobian of the outputs in the layer's outputs."""
  apply_fn, params, x, t = _problem("mlp")
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="sampled")

  def one(key):
    stats = fn(params, x, t, key)[2]["layer_stats"]()
    return {n: s.output_grads.T @ s.output_grads / x.shape[0] for n, s in stats.items()}

  samples = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), 4000))
  p = jax.nn.softmax(apply_fn(params, x))
  fisher = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
  _assert_monte_carlo(np.asarray(samples["out"]), np.asarray(fisher.mean(0)))
  hidden, out = params["hidden"], params["out"]
  head = lambda z: jnp.tanh(z) @ out["kernel"] + out["bias"]
  jac = jax.vmap(jax.jacobian(head))(x @ hidden["kernel"] + hidden["bias"])
  pulled = jnp.einsum("bki,bkl,blj->bij", jac, fisher, jac).mean(0)
  _assert_monte_carlo(np.asarray(samples["hidden"]), np.asarray(pulled))


@jax.jit
def _dense(layer, x):
  return x @ layer["kernel"] + layer["bias"]


@jax.custom_jvp
def _rounded(x):
  """``round(4 x) / 4`` with a straight-through derivative: inlined, its gradient would be 0."""
  return jnp.round(4 * x) / 4


_rounded.defjvp(lambda primals, tangents: (_rounded(primals[0]), tangents[0]))


@jax.custom_vjp
def _project(x, kernel):
  return x @ kernel


_project.defvjp(lambda x, k: (x @ k, (x, k)), lambda res, g: (g @ res[1].T, res[0].T @ g))


def wrapped(params, x):
  """Layers inside ``jax.jit``, ``jax.checkpoint`` and ``jax.custom_vjp``; ``jax.nn.relu`` and a
  custom derivative with no layer inside."""
  p = params
  h = jax.nn.relu(_dense(p["jit"], x))
  h = _rounded(h)
  h = jax.checkpoint(lambda h: jnp.tanh(_dense(p["remat"], h)))(h)
  h = jnp.tanh(_project(h, p["custom"]["kernel"]) + p["custom"]["bias"])
  return h @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.usefixtures("x64")
def test_layers_inside_calls_and_custom_rules_kept():
  """Products inside jit, checkpoint and custom_vjp functions are captured (inlined); a custom
  derivative with no layer inside keeps its rule (else the layer below it would get ``g = 0``)."""
  params = _init({n: ((4, 4), (4,)) for n in ("jit", "remat", "custom")} | {"head": ((4, 3), (3,))})
  rng = np.random.default_rng(3)
  x, t = jnp.asarray(rng.normal(size=(5, 4))), jnp.asarray(rng.integers(0, 3, size=5))
  fn = cgfac.value_grad_and_extra(wrapped, fisher="empirical")
  report = fn.layers(params, x)
  assert set(report.layers) == set(params) and not report.fallback
  assert re.search(r"in p?jit\(_dense\)", report.layers["jit"][0])
  _, grads, stats = jax.tree.map(np.asarray, run(fn, params, x, t))
  per_example = jax.tree.map(np.asarray, per_example_grads(wrapped, params, x, t))
  assert np.abs(per_example["jit"]["kernel"]).max() > 1e-3  # the straight-through rule
  for layer, s in stats.items():
    kernel = np.einsum("bi,bo->bio", s.inputs, s.output_grads)
    np.testing.assert_allclose(kernel, per_example[layer]["kernel"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(kernel.mean(0), grads[layer]["kernel"], rtol=1e-9, atol=1e-12)


def unmatched(params, x):
  """One layer (the head) among parameters and products that are not layers."""
  p = params
  h = x * p["norm"]["scale"]  # not a kernel
  h = h @ p["tied"]["kernel"].T  # a kernel in the (d_out, d_in) layout
  scores = jnp.einsum("btd,bsd->bts", h, h)  # two activations
  h = jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores), h)

  def cell(c, h_t):  # a kernel used only inside a loop
    return jnp.tanh(c @ p["cell"]["kernel"] + h_t), None

  c, _ = lax.scan(cell, jnp.zeros_like(h[:, 0]), jnp.swapaxes(h, 0, 1))
  return c @ p["head"]["kernel"] + p["head"]["bias"]


def _unmatched_problem():
  rng = np.random.default_rng(0)
  params = {
    "norm": {"scale": jnp.ones(4)},
    "tied": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)},
    "cell": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "bias": jnp.zeros(3)},
  }
  return params, jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32), jnp.array([0, 2])


def test_report_says_what_is_matched_and_why_not():
  params, x, t = _unmatched_problem()
  fn = cgfac.value_grad_and_extra(unmatched)
  report = fn.layers(params, x)
  assert list(report.layers) == ["head"]
  assert report.layers["head"] == ("dot_general float32[2,4] x float32[4,3] -> float32[2,3]",)
  assert set(report.fallback) == {"norm/scale", "tied/kernel", "cell/kernel"}
  assert report.fallback["norm/scale"] == "not a layer's kernel or bias (used by mul)"
  assert report.fallback["tied/kernel"] == "used by transpose"
  assert report.fallback["cell/kernel"] == "used by scan (products inside scan are not matched)"
  assert sum("both operands are activations" in line for line in report.products) == 2
  text = str(report)
  assert "layers (1):\n  head: dot_general" in text
  assert "parameters left to the optimizer's fallback (3):\n  " in text
  assert "products that are not layers (3):\n  " in text
  # The model trains with stats for its one layer; the rest is the optimizer's fallback.
  _, _, stats = run(fn, params, x, t, jax.random.key(0))
  assert list(stats) == ["head"] and stats["head"].inputs.shape == (2, 4)


@pytest.mark.parametrize(
  "apply_fn, message",
  [
    (
      lambda p, x: x @ p["layer"]["kernel"].T,
      "no product in the model is a layer. A layer is a dot_general",
    ),
    (
      lambda p, x: jnp.tanh(x @ p["layer"]["kernel"]) + p["layer"]["bias"],
      "layer 'layer': its bias must be added to the output of its product dot_general "
      "float32[2,3] x float32[3,3] -> float32[2,3], but it is used by add; the optimizer would "
      "precondition it as this layer's bias",
    ),
    (
      lambda p, x: x @ p["layer"]["kernel"] + p["layer"]["bias"],
      "layer 'layer': its bias has 1 entries but its products have 3 outputs",
    ),
    (
      lambda p, x: lax.scan(
        lambda c, _: (jnp.tanh(c @ p["layer"]["kernel"]), None),
        x @ p["layer"]["kernel"] + p["layer"]["bias"],
        length=2,
      )[0],
      "layer 'layer': its kernel is matched in dot_general float32[2,3] x float32[3,3] -> "
      "float32[2,3] but also used by scan (products inside scan are not matched), where its "
      "curvature stats cannot be captured",
    ),
  ],
  ids=["no-layer", "bias-not-added", "bias-size", "layer-inside-scan"],
)
def test_errors_name_the_layer(apply_fn, message, request):
  bias = jnp.zeros(1 if request.node.callspec.id == "bias-size" else 3)
  params = {"layer": {"kernel": jnp.ones((3, 3)), "bias": bias}}
  x, t = jnp.ones((2, 3)), jnp.array([0, 1])
  fn = cgfac.value_grad_and_extra(apply_fn)
  with pytest.raises(ValueError, match=re.escape(message)):
    fn(params, x, t, jax.random.key(0))


def test_argument_errors():
  with pytest.raises(TypeError, match="apply_fn must be a function"):
    cgfac.value_grad_and_extra("model")
  with pytest.raises(ValueError, match="loss must be one of"):
    cgfac.value_grad_and_extra(mlp, loss="hinge")
  with pytest.raises(ValueError, match="curvature_batch_size must be None, a positive int"):
    cgfac.value_grad_and_extra(mlp, curvature_batch_size=0)
  fn = cgfac.value_grad_and_extra(lambda p, x: x * p["kernel"])
  with pytest.raises(ValueError, match="inputs must be an array or a pytree of arrays whose"):
    fn.layers({"kernel": jnp.ones(2)}, jnp.ones(()))


def test_training_halves_the_loss_without_recompiling(caplog):
  """``cgfac()`` (step sizes from the quadratic model, which reads ``curvature_model``, ``value``
  and ``value_fn`` from ``extra``) on a tiny classification problem, one compiled step."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
  t = jnp.asarray(np.argmax(np.asarray(x) @ rng.normal(size=(8, 4)), axis=1))
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]), jnp.float32)
  params = {
    "hidden": {"kernel": normal(8, 32), "bias": jnp.zeros(32)},
    "out": {"kernel": normal(32, 4), "bias": jnp.zeros(4)},
  }
  fn = cgfac.value_grad_and_extra(mlp)
  tx = cgfac.cgfac()

  @jax.jit
  def step(params, state, key):
    loss, grads, extra = fn(params, x, t, key)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, loss

  compiled = lambda: [
    r for r in caplog.records if re.search(r"compil.*jit\(step\)", r.getMessage())
  ]
  state, losses = tx.init(params), []
  with jax.log_compiles(), caplog.at_level("DEBUG", logger="jax"):
    for key in jax.random.split(jax.random.key(0), 20):
      params, state, loss = step(params, state, key)
      losses.append(float(loss))
      if len(losses) == 1:
        assert compiled(), "the first call's compilation should be logged"
        caplog.clear()
    assert not compiled(), caplog.text
  assert step._cache_size() == 1
  assert losses[-1] < 0.5 * losses[0], losses


def dropout_mlp(params, x, *, dropout, train):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  if train:  # a Python flag: it must reach apply_fn as it is
    h = h * jax.random.bernoulli(dropout, 0.5, h.shape) / 0.5
  return h @ params["out"]["kernel"] + params["out"]["bias"]


@pytest.mark.usefixtures("x64")
def test_kwargs_reach_every_pass():
  """The stats pass draws the loss pass's dropout masks (else the rows would not give the batch
  gradient); weights and the curvature batch size go through the engine."""
  _, params, x, t = _problem("mlp")
  kwargs = {"dropout": jax.random.key(5), "train": True}
  fn = cgfac.value_grad_and_extra(dropout_mlp, fisher="empirical")
  _, grads, stats = jax.tree.map(np.asarray, run(fn, params, x, t, **kwargs))
  _, plain_grads, _ = run(fn, params, x, t, dropout=kwargs["dropout"], train=False)
  assert not np.allclose(grads["out"]["kernel"], plain_grads["out"]["kernel"])
  for layer, s in stats.items():
    kernel = np.einsum("bi,bo->io", s.inputs, s.output_grads) / x.shape[0]
    np.testing.assert_allclose(kernel, grads[layer]["kernel"], rtol=1e-9, atol=1e-12)

  w = jnp.array([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], F64)
  fn = cgfac.value_grad_and_extra(dropout_mlp, fisher="empirical", curvature_batch_size=4)
  loss, _, stats = run(fn, params, x, t, weights=w, **kwargs)
  per_example = per_example_loss(dropout_mlp(params, x, **kwargs), t)
  np.testing.assert_allclose(loss, jnp.sum(w * per_example) / jnp.sum(w), rtol=1e-12)
  assert stats["hidden"].inputs.shape == (4, 5) and stats["out"].output_grads.shape == (4, 3)


class FlaxModel(nn.Module):
  """Conv, self-attention (DenseGeneral projections) and Dense, from Flax."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (2, 2), strides=2, param_dtype=F64)(x))
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, param_dtype=F64)(x)
    return nn.Dense(3, param_dtype=F64)(x.mean(1))


@pytest.mark.usefixtures("x64")
def test_flax_model_as_a_function_gives_the_linen_stats():
  """``model.apply`` as a plain function: the same layers and stats as the Linen front end."""
  model = FlaxModel()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 2)))
  t = jnp.array([0, 1, 2])
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="empirical")
  loss, grads, stats = run(fn, params, x, t)
  want_loss, want_grads, want_stats = run(
    cflax.value_grad_and_extra(model, fisher="empirical"), params, x, t
  )
  np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), grads, want_grads
  )
  got, want = cgfac_layers.flatten_stats(stats), cgfac_layers.flatten_stats(want_stats)
  assert set(got) == set(want) and len(got) == 6
  for layer in want:
    for a, b in zip(got[layer], want[layer]):
      np.testing.assert_allclose(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), atol=1e-13)
