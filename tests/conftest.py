"""Shared fixtures (float64 for the tests that need it, without leaking to the others) and the
order of the tests: the slow ones first."""

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


def pytest_collection_modifyitems(items):
  """Runs the tests marked ``slow`` first, each group in its collected order.

  Under ``pytest -n`` the workers start on the long runs and share the short tests at the end,
  instead of one worker finishing a long run alone.
  """
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
