"""The quick-start notebook: stored without outputs, public API only, runs top to bottom.

The run uses the notebook's small-steps setting (``CGFAC_NOTEBOOK_STEPS``) and the
Agg-based inline matplotlib backend of the Jupyter kernel, so it needs no display.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SMALL_STEPS = "12"
# One figure each: loss vs time, CG iterations and residuals, damping, max_iters, the transformer.
EXPECTED_FIGURES = 5


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _code(nb) -> list[str]:
  return [c.source for c in nb.cells if c.cell_type == "code"]


def test_outputs_are_stripped():
  nb = _read()
  nbformat.validate(nb)
  dirty = [
    i
    for i, c in enumerate(nb.cells)
    if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
  ]
  assert not dirty, f"cells {dirty} of {NOTEBOOK.name} have outputs or execution counts"
  assert "widgets" not in nb.metadata, "notebook metadata holds widget state"


def test_uses_public_api_only():
  # A private name is one with a single leading underscore: cgfac_optax._cg, cflax._capture.
  pattern = re.compile(r"\b(cgfac_optax|cflax)(\.\w+)*\._(?!_)")
  private = [s for s in _code(_read()) if pattern.search(s)]
  assert not private, f"cells reach into private modules: {private}"


_REAL_FIND_SPEC = importlib.util.find_spec


def _run_install_cell(monkeypatch, *, colab: bool, installed: bool, pip_returncode: int = 0):
  """Runs the first cell with Colab, the installed package and pip faked; returns pip's calls."""
  import subprocess
  import types

  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, pip_returncode, "", "ERROR: No matching distribution")

  monkeypatch.setattr(subprocess, "run", fake_run)
  if colab:
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
  else:
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
  real_find_spec = _REAL_FIND_SPEC
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: (
      (real_find_spec(name, *a) if installed else None)
      if name == "cgfac_optax"
      else real_find_spec(name, *a)
    ),
  )
  exec(_code(_read())[0], {})
  return calls


def test_install_cell_installs_the_named_source_only_in_colab(monkeypatch):
  first = _code(_read())[0]
  assert '"google.colab" in sys.modules' in first
  # The source is a variable at the top, by default the package index name with the demo extras.
  assert re.search(r'^SOURCE = "cgfac_optax\[demo\]"$', first, re.M)
  assert "github.com" not in first
  assert _run_install_cell(monkeypatch, colab=False, installed=False) == []
  assert _run_install_cell(monkeypatch, colab=True, installed=True) == []
  calls = _run_install_cell(monkeypatch, colab=True, installed=False)
  assert calls == [[sys.executable, "-m", "pip", "install", "--quiet", "cgfac_optax[demo]"]]
  # When pip fails (not published yet, a wrong source), the message says what to set.
  with pytest.raises(
    RuntimeError, match=r"(?s)SOURCE = 'cgfac_optax\[demo\]'.*No matching.*set SOURCE"
  ):
    _run_install_cell(monkeypatch, colab=True, installed=False, pip_returncode=1)


@pytest.mark.slow
def test_notebook_runs(monkeypatch, tmp_path):
  nb = _read()
  monkeypatch.setenv("CGFAC_NOTEBOOK_STEPS", SMALL_STEPS)
  # The inline backend renders with Agg: no display needed, and figures land in the outputs.
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The kernel imports this checkout of the package, installed or not.
  path = os.environ.get("PYTHONPATH", "")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), path) if p))
  # Ask the kernel which interpreter and which cgfac_optax it ran (jupyter_client starts the
  # "python3" kernel with sys.executable, so it sees this environment).
  nb.cells.append(
    nbformat.v4.new_code_cell(
      "import sys, cgfac_optax\nprint(sys.prefix)\nprint(cgfac_optax.__file__)"
    )
  )
  client = nbclient.NotebookClient(
    nb,
    kernel_name="python3",
    timeout=600,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError on any error, naming the cell

  *notebook_cells, check = nb.cells
  outputs = [o for c in notebook_cells if c.cell_type == "code" for o in c.outputs]
  figures = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(figures) == EXPECTED_FIGURES
  prefix, package = check.outputs[0]["text"].split()
  assert prefix == sys.prefix
  assert Path(package).resolve().is_relative_to(ROOT)
