"""Sphinx configuration: MyST pages, and the API reference from the docstrings.

``make docs`` builds with ``-W -n``: a warning fails the build and every cross-reference must
resolve. References that cannot resolve here are listed below, with the reason.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import cgfac_optax  # noqa: E402

project = "cgfac_optax"
release = version = cgfac_optax.__version__

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
# The generated results page is part of benchmarks.md (an include), not a page of its own.
exclude_patterns = ["_build", "benchmarks_results.md"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# Signatures as a call reads (``cgfac(learning_rate=None, damping=None, *, momentum=0.9, ...)``),
# one argument a line when long: the annotations would spell out aliases such as optax.Schedule
# as the unions they stand for, and each docstring says in words what an argument takes.
autodoc_typehints = "none"
python_maximum_signature_line_length = 88
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"cgfac_optax {release}"

# Nitpicky mode, with two kinds of target left unlinked:
# - other projects' objects (jax.Array, optax.Updates, flax's modules, ...) in signatures and
#   docstrings: linking them needs their inventories (intersphinx), which the build would fetch
#   from their documentation sites, and CI reaches only the package index;
# - this package's private modules and names (``cgfac_optax._memory``, ``default_skip``), which
#   docstrings point to for the details of the implementation and the API reference leaves out.
_EXTERNAL = ("jax", "jaxlib", "optax", "flax", "numpy", "chex", "collections", "typing")
nitpick_ignore_regex = [
  (r"py:.*", rf"({'|'.join(_EXTERNAL)})(\..+)?"),
  (r"py:.*", r"cgfac_optax(\.\w+)*\._\w+(\..+)?"),
]
nitpick_ignore = [("py:func", "default_skip")]  # cgfac_optax._cg.default_skip


def _drop_type_docstring(app, what, name, obj, options, lines):
  """A module-level value without docs of its own (``cgfac_optax.flax.RULES``, a dict) would
  show its type's docstring; the API page says what the value is instead."""
  type_doc = (type(obj).__doc__ or "").strip()
  if what == "data" and type_doc and "\n".join(lines).strip() in type_doc:
    lines.clear()


_NAMES_WRAPPED = re.compile(r"^(\s+)(\w+, )*\w+,$")


def _join_wrapped_names(app, what, name, obj, options, lines):
  """An Args entry documenting several options together may wrap its list of names
  (``tol, warm_start, ...,`` then ``cg_skip: see ...`` on the next line); napoleon reads an
  entry's names from its first line only, so the wrapped names are joined onto it first."""
  i = 0
  while i + 1 < len(lines):
    first = _NAMES_WRAPPED.match(lines[i])
    rest = lines[i + 1]
    if first and rest.startswith(first.group(1) + " ") and ":" in rest:
      lines[i : i + 2] = [f"{lines[i]} {rest.strip()}"]
    else:
      i += 1


def setup(app):
  app.connect("autodoc-process-docstring", _drop_type_docstring)
  # Before napoleon (priority 500) turns the Args sections into field lists.
  app.connect("autodoc-process-docstring", _join_wrapped_names, priority=400)
