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
# One figure each: the training loss of every run, and what the optimizer's state logged.
EXPECTED_FIGURES = 2


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


def _run_install_cell(monkeypatch, *, installed: bool, source=None, pip_returncode: int = 0):
  """Runs the first cell with find_spec, the source and pip faked; returns pip's calls."""
  import subprocess

  calls = []

  def fake_run(cmd, **kwargs):
    calls.append(cmd)
    return subprocess.CompletedProcess(cmd, pip_returncode, "", "ERROR: No matching distribution")

  monkeypatch.setattr(subprocess, "run", fake_run)
  if source is None:
    monkeypatch.delenv("CGFAC_OPTAX_SOURCE", raising=False)
  else:
    monkeypatch.setenv("CGFAC_OPTAX_SOURCE", str(source))
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


def test_install_cell_installs_only_what_is_missing(monkeypatch):
  first = _code(_read())[0]
  assert "github.com" not in first
  assert _run_install_cell(monkeypatch, installed=True) == []
  assert _run_install_cell(monkeypatch, installed=True, source="/nowhere") == []


def test_install_cell_installs_from_the_index_or_the_source_it_is_given(monkeypatch, tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "--quiet"]
  # Not set: the package index.
  assert _run_install_cell(monkeypatch, installed=False) == [[*pip, "cgfac_optax[demo]"]]
  # A wheel or a checkout: installed from that path, with the demo extras.
  wheel = tmp_path / "cgfac_optax-0.1.0-py3-none-any.whl"
  wheel.touch()
  for path in (wheel, tmp_path):
    calls = _run_install_cell(monkeypatch, installed=False, source=path)
    assert calls == [[*pip, f"cgfac_optax[demo] @ {path.resolve().as_uri()}"]]
  # Anything else goes to pip as it is (a URL).
  url = "cgfac_optax[demo] @ https://example.org/cgfac_optax.tar.gz"
  assert _run_install_cell(monkeypatch, installed=False, source=url) == [[*pip, url]]


def test_install_cell_says_what_to_set_when_pip_fails(monkeypatch, tmp_path):
  # Not published yet (or offline): the message says what to set, and pip's own error.
  with pytest.raises(
    RuntimeError, match=r"(?s)from the package index.*No matching.*Set .*CGFAC_OPTAX_SOURCE"
  ):
    _run_install_cell(monkeypatch, installed=False, pip_returncode=1)
  with pytest.raises(RuntimeError, match=r"(?s)from CGFAC_OPTAX_SOURCE='/nowhere/x.whl'.*Set "):
    _run_install_cell(monkeypatch, installed=False, source="/nowhere/x.whl", pip_returncode=1)


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
