"""Shared fixtures (float64 for the tests that need it, without leaking to the others), the
order of the tests (the slow ones first), XLA's cheapest CPU code generation and a compilation
cache shared by the run's processes."""

import atexit
import os
import shutil
import tempfile

# Set before JAX starts its backend, in this process and the scripts the tests start: the suite
# is dominated by compiling many small programs, which this makes about 40% faster; no test
# times anything. A flag already given in XLA_FLAGS keeps the caller's value.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_flags, *(f for f in _FAST_COMPILE if f.split("=")[0] not in _flags)]
).strip()

# The scripts and workers the tests start compile many of the same programs (the same tiny
# models and optimizers): a persistent cache for this run, in a fresh folder removed at the end,
# lets each be compiled once. pytest-xdist's workers and the scripts inherit the folder. A cache
# folder the caller set is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="cgfac-optax-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402
import pytest  # noqa: E402


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
