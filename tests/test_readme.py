"""README.md, the front door: short, its quick start, and every ```python block runs and trains."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
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


def test_readme_is_a_front_door():
  assert len(README.splitlines()) <= 200
  quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)```", quick_start, re.S)[0].split()
  assert commands == ["make", "demo", "make", "test"]
  # The figures of the "when it pays" sentence come from the benchmarks page, on a line of
  # their own.
  assert README.count("<!-- figures: from the benchmarks page -->") == 1
  assert "](benchmarks/results/autoencoder/time_to_target.png)" in README
  for page in re.findall(r"\]\((docs/[\w/]+\.md)\)", README):
    assert (ROOT / page).exists(), page


def test_readme_examples_are_the_three_front_ends():
  # First a complete Linen loop with cgfac(), then NNX, then plain JAX, each passing extra whole.
  linen, nnx, plain = BLOCKS
  assert FLAX_MARKER in linen and "cflax.TrainState.create(" in linen
  assert "cflax.value_grad_and_extra(" in linen and "load_digits" in linen
  assert len(linen.strip().splitlines()) <= 35
  assert "cflax.nnx_value_grad_and_extra(" in nnx
  assert "optimizer.update(model, grads, **extra)" in nnx
  assert "cgfac.value_grad_and_extra(" in plain and "flax" not in plain
  for block in BLOCKS:
    assert "cgfac.cgfac()" in block and "**extra)" in block


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_and_trains(index, tmp_path):
  stdout = run_block(index, tmp_path)
  first, last = map(float, re.search(r"loss (\S+) -> (\S+)", stdout).groups())
  assert last < 0.5 * first, stdout
