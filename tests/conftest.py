"""Shared fixtures: float64 for the tests that need it, without leaking to the others."""

import jax
import pytest


def _enable_x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # jax < 0.8

  return enable_x64()


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled, restoring the setting afterwards."""
  with _enable_x64():
    yield
