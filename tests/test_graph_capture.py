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
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import cgfac_optax as cgfac

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
  """Per example, ``sum_positions a g^T`` is its kernel gradient and ``sum g`` its bias gradient;
  their means are the batch gradient ``fn`` returns."""
  apply_fn, params, x, t = _problem(name)
  fn = cgfac.value_grad_and_extra(apply_fn, fisher="empirical")
  loss, grads, stats = jax.tree.map(np.asarray, run(fn, params, x, t))
  per_example = jax.tree.map(np.asarray, per_example_grads(apply_fn, params, x, t))
  mean_loss = jax.jit(lambda p, x, t: per_example_loss(apply_fn(p, x), t).mean())
  np.testing.assert_allclose(loss, mean_loss(params, x, t), rtol=1e-12)
  assert set(stats) == set(params)
  b = x.shape[0]
  for layer, s in stats.items():
    a, g = (v.reshape(b, -1, v.shape[-1]) for v in s)
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
  """``A = a^T a / rows`` (with the bias column) and ``G = g^T g / B`` from the hand-made rows and
  per-example Jacobians, every use of a layer side by side."""
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
    np.testing.assert_allclose(big_g, g.T @ g / b, rtol=1e-10, atol=1e-12)
