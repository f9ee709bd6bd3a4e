"""The loss table: output Hessian products against ``jax.hessian`` of the batch loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgfac_optax
from cgfac_optax import _losses

LOSSES = sorted(_losses.LOSSES)
SHAPES = [(3, 4), (3, 2, 4), (2, 3, 2, 3)]  # no position axis, one, two


def _targets(loss, key, outputs):
  if loss == "softmax_cross_entropy":
    return jax.random.randint(key, outputs.shape[:-1], 0, outputs.shape[-1])
  return jax.random.uniform(key, outputs.shape, outputs.dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss", LOSSES)
def test_output_hvp_is_hessian_of_mean_loss(x64, loss, shape):
  kind = _losses.get_loss(loss)
  k1, k2 = jax.random.split(jax.random.key(0))
  outputs = 2 * jax.random.normal(k1, shape, jnp.float64)
  targets = _targets(loss, k2, outputs)

  def mean_loss(flat):
    return kind.per_example(flat.reshape(shape), targets).mean()

  n = outputs.size
  reference = jax.hessian(mean_loss)(outputs.reshape(-1))
  basis = jnp.eye(n, dtype=jnp.float64).reshape((n, *shape))
  ours = jax.vmap(lambda v: kind.output_hvp(outputs, v).reshape(-1))(basis)
  assert ours.dtype == jnp.float64
  np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", LOSSES)
def test_output_hvp_promotes_low_precision(loss):
  kind = _losses.get_loss(loss)
  outputs = jax.random.normal(jax.random.key(1), (4, 5))
  tangent = jax.random.normal(jax.random.key(2), (4, 5))
  low = kind.output_hvp(outputs.astype(jnp.bfloat16), tangent.astype(jnp.bfloat16))
  full = kind.output_hvp(outputs.astype(jnp.bfloat16).astype(jnp.float32), tangent)
  assert low.dtype == jnp.float32
  # Same inputs up to the bfloat16 rounding of the tangent; the math itself ran in float32.
  np.testing.assert_allclose(low, full, rtol=2e-2, atol=1e-3)


def test_capture_and_flax_subpackage_use_the_moved_table():
  from cgfac_optax import _capture
  from cgfac_optax.flax import linen, nnx

  assert _capture._losses is _losses
  assert linen._losses is _losses
  assert nnx._losses is _losses
  assert cgfac_optax.flax.value_grad_and_extra is linen.value_grad_and_extra
  assert cgfac_optax.flax.nnx_value_grad_and_extra is nnx.nnx_value_grad_and_extra
