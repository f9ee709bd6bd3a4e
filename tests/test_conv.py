"""Conv blocks: patch rows, per-example gradients, products and solves vs explicit references."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cgfac_optax as cgfac
from cgfac_optax import _layers
from cgfac_optax._solvers import SOLVERS

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import oracles  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")  # tests/conftest.py


# (strides, padding, kernel dilation) of the configurations under test.
CONFIGS = {
  "stride2-same": ((2, 2), "SAME", (1, 1)),
  "stride2-valid": ((2, 2), "VALID", (1, 1)),
  "dilation2-same": ((1, 1), "SAME", (2, 2)),
  "dilation2-stride2-valid": ((2, 1), "VALID", (2, 2)),
}


def _same_padding(size, k, stride, dilation):
  out = -(-size // stride)
  total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def explicit_patches(x, kernel_size, strides, padding, dilation):
  """Receptive fields by loops over output positions: ``(B, Ho, Wo, kh kw c)``."""
  x = np.asarray(x)
  (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
  if padding == "SAME":
    pads = [_same_padding(x.shape[1], kh, sh, dh), _same_padding(x.shape[2], kw, sw, dw)]
  else:
    pads = [(0, 0), (0, 0)]
  xp = np.pad(x, [(0, 0), *pads, (0, 0)])
  ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
  wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
  out = np.zeros((x.shape[0], ho, wo, kh, kw, x.shape[3]))
  for i in range(ho):
    for j in range(wo):
      for u in range(kh):
        for v in range(kw):
          out[:, i, j, u, v] = xp[:, i * sh + u * dh, j * sw + v * dw]
  return out.reshape(x.shape[0], ho, wo, -1)


def conv(x, kernel, bias, strides, padding, dilation):
  y = lax.conv_general_dilated(
    x,
    kernel,
    strides,
    padding,
    rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=lax.Precision.HIGHEST,
  )
  return y + bias


def _problem(config, batch=3, size=(7, 6), cin=2, cout=3, ksize=(3, 2)):
  strides, padding, dilation = CONFIGS[config]
  kx, kk, kb, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (batch, *size, cin))
  kernel = jax.random.normal(kk, (*ksize, cin, cout)) / 3
  bias = jax.random.normal(kb, (cout,))
  y_shape = conv(x, kernel, bias, strides, padding, dilation).shape
  targets = jax.random.normal(kc, y_shape)

  def example_loss(params, xj, tj):
    y = conv(xj[None], params["kernel"], params["bias"], strides, padding, dilation)
    return jnp.sum(jnp.tanh(y[0]) * tj)

  return x, {"kernel": kernel, "bias": bias}, targets, example_loss


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_patches_equal_explicit_receptive_fields(config):
  strides, padding, dilation = CONFIGS[config]
  x, params, _, _ = _problem(config)
  p = cgfac.conv_patches(
    x, params["kernel"].shape, window_strides=strides, padding=padding, rhs_dilation=dilation
  )
  ref = explicit_patches(x, params["kernel"].shape[:2], strides, padding, dilation)
  np.testing.assert_allclose(p, ref, rtol=0, atol=0)
  y = conv(x, params["kernel"], 0.0, strides, padding, dilation)
  np.testing.assert_allclose(p @ params["kernel"].reshape(-1, 3), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
  "dimension_numbers, perm_x, perm_k",
  [
    (("NCHW", "IHWO", "NCHW"), (0, 3, 1, 2), (2, 0, 1, 3)),
    (("NWHC", "WHIO", "NHWC"), (0, 2, 1, 3), (1, 0, 2, 3)),
  ],
)
def test_patches_follow_the_kernel_layout(dimension_numbers, perm_x, perm_k):
  x, params, _, _ = _problem("stride2-same")
  xt, kt = jnp.transpose(x, perm_x), jnp.transpose(params["kernel"], perm_k)
  kwargs = dict(window_strides=(2, 1), padding=((1, 0), (2, 1)), lhs_dilation=(1, 2))
  y = lax.conv_general_dilated(
    xt, kt, dimension_numbers=dimension_numbers, precision=lax.Precision.HIGHEST, **kwargs
  )
  p = cgfac.conv_patches(xt, kt.shape, dimension_numbers=dimension_numbers, **kwargs)
  y_rows = cgfac.conv_output_rows(y, dimension_numbers)
  np.testing.assert_allclose(p @ kt.reshape(-1, kt.shape[-1]), y_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
  "x_shape, k_shape, dimension_numbers, kwargs",
  [
    # 1-D, input and kernel dilation with a negative (cropping) pad.
    ((2, 11, 3), (3, 3, 4), ("NWC", "WIO", "NWC"), dict(padding=((2, -1),), lhs_dilation=(2,))),
    # 3-D, channels first, strides and kernel dilation, SAME.
    (
      (2, 3, 6, 5, 7),
      (2, 3, 2, 3, 4),
      ("NCDHW", "DHWIO", "NDHWC"),
      dict(window_strides=(1, 2, 2), padding="SAME", rhs_dilation=(2, 1, 2)),
    ),
  ],
)
def test_patches_in_1d_and_3d_equal_lax_convolution(x_shape, k_shape, dimension_numbers, kwargs):
  kx, kk = jax.random.split(jax.random.key(3))
  x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
  kwargs = {"window_strides": (1,) * (len(k_shape) - 2), **kwargs}
  y = lax.conv_general_dilated(
    x, kernel, dimension_numbers=dimension_numbers, precision=lax.Precision.HIGHEST, **kwargs
  )
  p = cgfac.conv_patches(x, k_shape, dimension_numbers=dimension_numbers, **kwargs)
  y_rows = cgfac.conv_output_rows(y, dimension_numbers)
  assert p.shape[:-1] == y_rows.shape[:-1]
  np.testing.assert_allclose(p @ kernel.reshape(-1, k_shape[-1]), y_rows, rtol=1e-12, atol=1e-12)


def test_patch_gradient_equals_the_convolution_gradient():
  """The patches' backward pass (the slices' transposes) is the convolution's input gradient."""
  x, params, targets, _ = _problem("dilation2-stride2-valid")
  strides, padding, dilation = CONFIGS["dilation2-stride2-valid"]
  kernel = params["kernel"]

  def by_patches(x):
    p = cgfac.conv_patches(
      x, kernel.shape, window_strides=strides, padding=padding, rhs_dilation=dilation
    )
    return jnp.sum(jnp.tanh(p @ kernel.reshape(-1, 3)) * targets)

  def by_conv(x):
    return jnp.sum(jnp.tanh(conv(x, kernel, 0.0, strides, padding, dilation)) * targets)

  np.testing.assert_allclose(jax.grad(by_patches)(x), jax.grad(by_conv)(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_patch_stats_reproduce_per_example_kernel_gradients(config):
  strides, padding, dilation = CONFIGS[config]
  x, params, targets, example_loss = _problem(config)
  per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, targets)

  def loss_of_output(y, tj):
    return jnp.sum(jnp.tanh(y) * tj)

  y = conv(x, params["kernel"], params["bias"], strides, padding, dilation)
  g = jax.vmap(jax.grad(loss_of_output))(y, targets)  # per-example output gradients
  stats = cgfac.conv_stats(
    x, g, params["kernel"].shape, window_strides=strides, padding=padding, rhs_dilation=dilation
  )
  a, gr = stats.inputs, stats.output_grads
  kernel_grads = jnp.einsum("bhwk,bhwo->bko", a, gr).reshape(per_example["kernel"].shape)
  np.testing.assert_allclose(kernel_grads, per_example["kernel"], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(gr.sum((1, 2)), per_example["bias"], rtol=1e-10, atol=1e-12)
  # The batch-mean gradient is the combined a^T g / B, bias as the last row.
  a1 = _layers.append_ones(_layers.to_rows(a))
  combined = a1.T @ _layers.to_rows(gr) / x.shape[0]
  mean = jax.tree.map(lambda t: t.mean(0), per_example)
  np.testing.assert_allclose(combined[:-1], mean["kernel"].reshape(-1, 3), rtol=1e-10)
  np.testing.assert_allclose(combined[-1], mean["bias"], rtol=1e-10)


def _explicit_factors(config, x, g, kernel_size):
  """``A`` and ``G`` with KFC scales from loop-built patches (bias row appended)."""
  strides, padding, dilation = CONFIGS[config]
  p = explicit_patches(x, kernel_size, strides, padding, dilation)
  return oracles.factors(p, g, bias=True)


def _conv_stats_and_grads(config):
  strides, padding, dilation = CONFIGS[config]
  x, params, targets, example_loss = _problem(config)
  y = conv(x, params["kernel"], params["bias"], strides, padding, dilation)
  g = jax.vmap(jax.grad(lambda y, t: jnp.sum(jnp.tanh(y) * t)))(y, targets)
  stats = cgfac.conv_stats(
    x, g, params["kernel"].shape, window_strides=strides, padding=padding, rhs_dilation=dilation
  )
  grads = jax.tree.map(
    lambda t: t.mean(0),
    jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, targets),
  )
  return x, g, params, grads, stats


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_conv_products_equal_explicit_kronecker(config):
  x, g, params, _, stats = _conv_stats_and_grads(config)
  big_a, big_g = _explicit_factors(config, x, g, params["kernel"].shape[:2])
  d_a, d_g = big_a.shape[0], big_g.shape[0]
  fisher = oracles.kron_matrix(big_a, big_g)
  rows = _layers.curvature_rows(stats, True, None, jnp.float64)
  assert (rows.scale_a, rows.scale_g) == _layers.factor_scales(stats)
  v = jax.random.normal(jax.random.key(3), (d_a, d_g))
  ref = (fisher @ v.ravel()).reshape(d_a, d_g)
  iterative = [s for s in SOLVERS.values() if s.iterative]
  assert iterative
  for method in iterative:  # each operator at zero damping is the block itself
    out = method.operator(oracles.prepare(method, rows, 0.0), v)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12, err_msg=method.name)
    if method.diagonal is not None:
      diag = method.diagonal(oracles.prepare(method, rows, 0.0))
      np.testing.assert_allclose(diag.ravel(), np.diag(fisher), rtol=1e-10, err_msg=method.name)


@pytest.mark.parametrize("solver", [n for n, s in SOLVERS.items() if s.exact])
@pytest.mark.parametrize("config", ["stride2-same", "dilation2-stride2-valid"])
def test_conv_solves_equal_explicit_kronecker(config, solver):
  x, g, params, grads, stats = _conv_stats_and_grads(config)
  big_a, big_g = _explicit_factors(config, x, g, params["kernel"].shape[:2])
  d_g = big_g.shape[0]
  damping = 0.1
  ref = oracles.kron_solve(big_a, big_g, damping, oracles.as_matrix(grads))
  tx = cgfac.scale_by_cgfac(damping, solver=solver, max_iters=500, tol=1e-12, warm_start=False)
  update = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))
  updates, _ = update({"conv": grads}, tx.init({"conv": params}), {"conv": stats})
  np.testing.assert_allclose(updates["conv"]["kernel"].reshape(-1, d_g), ref[:-1], rtol=1e-7)
  np.testing.assert_allclose(updates["conv"]["bias"], ref[-1], rtol=1e-7)


def test_1x1_conv_equals_dense_per_position():
  kx, kk, kt = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (3, 4, 5, 6))
  kernel = jax.random.normal(kk, (1, 1, 6, 4)) / 3
  targets = jax.random.normal(kt, (3, 4, 5, 4))
  y = conv(x, kernel, 0.0, (1, 1), "SAME", (1, 1))
  np.testing.assert_allclose(y, x @ kernel[0, 0], rtol=1e-12)
  g = jax.vmap(jax.grad(lambda y, t: jnp.sum(jnp.sin(y) * t)))(y, targets)
  conv_st = cgfac.conv_stats(x, g, kernel.shape, padding="SAME")
  dense_st = cgfac.DenseStats(inputs=x, output_grads=g)
  np.testing.assert_allclose(conv_st.inputs, dense_st.inputs, rtol=0, atol=0)
  np.testing.assert_allclose(conv_st.output_grads, dense_st.output_grads, rtol=0, atol=0)
  assert _layers.factor_scales(conv_st) == _layers.factor_scales(dense_st)

  bias = jnp.zeros(4)
  grad_k = jnp.einsum("bhwi,bhwo->io", x, g) / 3
  conv_p = {"l": {"kernel": kernel, "bias": bias}}
  dense_p = {"l": {"kernel": kernel[0, 0], "bias": bias}}
  conv_g = {"l": {"kernel": grad_k[None, None], "bias": g.sum((1, 2)).mean(0)}}
  dense_g = {"l": {"kernel": grad_k, "bias": g.sum((1, 2)).mean(0)}}
  for solver in SOLVERS:
    tx = cgfac.scale_by_cgfac(0.05, solver=solver, max_iters=3, tol=0.0)

    @jax.jit
    def both(tx=tx):
      conv = tx.update(conv_g, tx.init(conv_p), layer_stats={"l": conv_st})
      return conv, tx.update(dense_g, tx.init(dense_p), layer_stats={"l": dense_st})

    (uc, sc), (ud, sd) = both()
    np.testing.assert_allclose(uc["l"]["kernel"][0, 0], ud["l"]["kernel"], rtol=1e-12)
    np.testing.assert_allclose(uc["l"]["bias"], ud["l"]["bias"], rtol=1e-12)
    assert sc.iterations == sd.iterations


def test_grouped_conv_is_refused_with_the_group_count():
  with pytest.raises(ValueError, match="feature_group_count must be 1, got 2"):
    cgfac.conv_patches(jnp.ones((1, 4, 4, 4)), (3, 3, 2, 4), feature_group_count=2)


def test_kernel_output_dimension_must_be_last():
  with pytest.raises(ValueError, match="output-feature dimension must be last"):
    cgfac.conv_patches(
      jnp.ones((1, 3, 4, 4)), (4, 3, 3, 3), dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def test_channel_and_position_mismatches_name_the_shapes():
  with pytest.raises(ValueError, match="inputs have 3 channels but kernel_shape"):
    cgfac.conv_patches(jnp.ones((1, 4, 4, 3)), (3, 3, 2, 4))
  with pytest.raises(ValueError, match=r"output_grads \(1, 4, 4, 4\) do not match"):
    cgfac.conv_stats(
      jnp.ones((1, 4, 4, 3)), jnp.ones((1, 4, 4, 4)), (3, 3, 3, 4), window_strides=(2, 2)
    )
  with pytest.raises(ValueError, match="must have rank 4"):
    cgfac.conv_patches(jnp.ones((1, 4, 4, 3)), (3, 3, 4))


def test_conv_jacobi_preconditioned_cg_and_curvature_subsample():
  """Jacobi-preconditioned CG on a conv block, curvature from the first 2 of 3 examples."""
  config = "stride2-valid"
  x, g, params, grads, stats = _conv_stats_and_grads(config)
  big_a, big_g = _explicit_factors(config, x[:2], g[:2], params["kernel"].shape[:2])
  d_g = big_g.shape[0]
  damping = 0.1
  ref = oracles.kron_solve(big_a, big_g, damping, oracles.as_matrix(grads))
  tx = cgfac.scale_by_cgfac(
    damping, preconditioner="jacobi", curvature_batch_size=2, max_iters=500, tol=1e-12
  )
  update = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))
  updates, state = update({"conv": grads}, tx.init({"conv": params}), {"conv": stats})
  np.testing.assert_allclose(updates["conv"]["kernel"].reshape(-1, d_g), ref[:-1], rtol=1e-7)
  np.testing.assert_allclose(updates["conv"]["bias"], ref[-1], rtol=1e-7)
  assert 0 < int(state.iterations["conv"]) < 500
