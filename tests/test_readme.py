"""Every ```python block of README.md runs as written."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
  assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
  script = tmp_path / f"readme_{index}.py"
  script.write_text(BLOCKS[index])
  proc = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
