"""Every ```python block of README.md runs as written; the training examples also train."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
FLAX_MARKER = "from cgfac_optax import flax as cflax"


def run_block(index: int, tmp_path: pathlib.Path) -> str:
  """Runs README block `index` as a script in a fresh interpreter; returns its stdout."""
  script = tmp_path / f"readme_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_readme_has_examples():
  assert len(BLOCKS) >= 1
  flax_blocks = [b for b in BLOCKS if FLAX_MARKER in b]
  assert any("cflax.value_grad_and_extra(" in b for b in flax_blocks)
  assert any("cflax.nnx_value_grad_and_extra(" in b for b in flax_blocks)
  assert any("cflax.TrainState.create(" in b for b in flax_blocks)
  # The helpers' extra goes to update whole: cgfac() reads all of it.
  assert any("cgfac.cgfac()" in b and "**extra)" in b for b in flax_blocks)
  # The pure-JAX example supplies cgfac()'s quadratic model by hand.
  assert "cgfac.CurvatureModel(" in BLOCKS[0] and "value_fn=" in BLOCKS[0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
  stdout = run_block(index, tmp_path)
  trained = re.search(r"loss (\S+) -> (\S+)", stdout)
  if FLAX_MARKER in BLOCKS[index] or "cgfac.CurvatureModel(" in BLOCKS[index]:
    assert trained, stdout
  if trained:
    first, last = map(float, trained.groups())
    assert last < 0.5 * first, stdout
