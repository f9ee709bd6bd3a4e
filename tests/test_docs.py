"""The docs pages (docs/*.md): every ```python block runs as written, and what they quote is real.

Each block is a whole script: it runs in a fresh interpreter in a temporary folder, as
``test_readme.py`` runs the README's, and a block that prints ``loss X -> Y`` must have halved
its loss. A block that is also in README.md word for word runs in ``test_readme.py`` and is
not run a second time here.

The messages that troubleshooting.md quotes in ```text blocks are matched against the string
literals of the package's sources, so a changed message fails here until the page follows.
The API page documents exactly the names in ``__all__``, and the benchmarks page names every
script in ``benchmarks/`` (and no file that is not there).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cgfac_optax
import cgfac_optax.flax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)
FENCE = r"```{lang}\n(.*?)```"


def blocks(text: str, lang: str = "python") -> list[str]:
  return re.findall(FENCE.format(lang=lang), text, re.S)


README_BLOCKS = set(blocks((ROOT / "README.md").read_text()))
BLOCKS = {
  f"{page.relative_to(DOCS).as_posix()}:{i}": code
  for page in PAGES
  for i, code in enumerate(blocks(page.read_text()))
}
RUN_HERE = sorted(name for name, code in BLOCKS.items() if code not in README_BLOCKS)


def test_pages_have_examples():
  names = {p.relative_to(DOCS).as_posix() for p in PAGES}
  expected = {"index", "getting_started", "how_it_works", "api", "recipes", "troubleshooting"}
  assert {f"{n}.md" for n in expected | {"benchmarks"}} <= names
  getting_started = [c for n, c in BLOCKS.items() if n.startswith("getting_started.md:")]
  # The three front ends, each passing extra whole to update; a model with BatchNorm and
  # dropout; the fixed-rate mode. Each one trains.
  assert any(
    "cflax.value_grad_and_extra(" in c and "cflax.TrainState" in c for c in getting_started
  )
  assert any("cflax.nnx_value_grad_and_extra(" in c for c in getting_started)
  assert any("cgfac.value_grad_and_extra(" in c and "flax" not in c for c in getting_started)
  assert any("collections=state.collections" in c and "rngs=" in c for c in getting_started)
  assert any("cgfac.cgfac(learning_rate=" in c for c in getting_started)
  assert all("**extra" in c for c in getting_started)
  assert all(re.search(r"print\(f\".*loss .*->", c) for c in getting_started)


REMOVED = (
  "value_grad_and_stats",
  "nnx_curvature_model",
  "cflax.curvature_model",
  "flax.curvature_model",
  "cflax.apply_gradients",
  "flax.apply_gradients",
  "curvature_rows",
)


def test_pages_use_the_api_as_it_is():
  for page in [*PAGES, ROOT / "README.md"]:
    text = page.read_text()
    assert not [name for name in REMOVED if name in text], page.name


@pytest.mark.parametrize("name", RUN_HERE)
def test_docs_block_runs(name, tmp_path):
  script = tmp_path / "block.py"
  script.write_text(BLOCKS[name])
  proc = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = re.search(r"loss (\S+) -> (\S+)", proc.stdout)
  if trained:
    first, last = map(float, trained.groups())
    assert last < 0.5 * first, proc.stdout
  assert list(tmp_path.iterdir()) == [script], "the block left files behind"


def _message_patterns() -> list[re.Pattern]:
  """Every string literal of the package as a regex: its text as written, any value (maybe
  empty) between."""
  patterns = []
  for path in (ROOT / "cgfac_optax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.JoinedStr):  # an f-string, adjacent literals joined
        parts = [
          re.escape(v.value) if isinstance(v, ast.Constant) else "(.*?)" for v in node.values
        ]
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):  # a %-format log line
        parts = [
          "(.*?)" if i % 2 else re.escape(s)
          for i, s in enumerate(re.split(r"(%[dsr])", node.value))
        ]
      else:
        continue
      # Some messages are templates filled by a checker: "tol must be < 1 (...), got 1.0" is
      # f"{name} must be {requirement}, got {value!r}"; a few words of text make a message.
      if sum(len(p) for p in parts if p != "(.*?)") >= 10:
        patterns.append(re.compile("".join(parts), re.S))
  return patterns


def test_troubleshooting_quotes_the_library_messages():
  text = (DOCS / "troubleshooting.md").read_text()
  quoted = [line for block in blocks(text, "text") for line in block.splitlines() if line]
  assert len(quoted) >= 15
  patterns = _message_patterns()
  for line in quoted:
    message = re.sub(r"^(\w+Error: |WARNING:cgfac_optax:)", "", line)
    assert message != line, f"quote without its exception type or log prefix: {line}"
    assert any(p.fullmatch(message) for p in patterns), f"no such message in cgfac_optax: {line}"


def test_api_page_documents_every_public_name_once():
  text = (DOCS / "api.md").read_text()
  sections = re.split(r"^## ", text, flags=re.M)
  for module, section in zip((cgfac_optax, cgfac_optax.flax), sections[1:]):
    assert section.startswith(f"`{module.__name__}`"), section[:40]
    documented = re.findall(r"^\.\. auto(?:function|class|data):: (\w+)", section, re.M)
    assert sorted(documented) == sorted(module.__all__), module.__name__


def test_benchmarks_page_names_every_script():
  # A script runs as __main__; the page may name the helper modules too, but only real files.
  text = (DOCS / "benchmarks.md").read_text()
  files = {p.name: p.read_text() for p in (ROOT / "benchmarks").glob("*.py")}
  scripts = {n for n, code in files.items() if not n.startswith("_") and "__main__" in code}
  named = set(re.findall(r"`(\w+\.py)", text))
  assert scripts <= named, f"scripts missing from the page: {sorted(scripts - named)}"
  assert named <= set(files), f"no such files: {sorted(named - set(files))}"
