"""The Flax examples of README.md run and train."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = "from cgfac_optax import flax as cflax"


README = ROOT / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if MARKER in b]


def test_linen_and_nnx_examples_exist():
  assert any("cflax.value_grad_and_stats(" in b for b in BLOCKS)
  assert any("cflax.nnx_value_grad_and_stats(" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_flax_example_runs_and_trains(index, tmp_path):
  script = tmp_path / f"flax_example_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, last = map(float, re.search(r"loss (\S+) -> (\S+)", proc.stdout).groups())
  assert last < 0.5 * first, proc.stdout
