"""The package's functions stay short, and only the solver records know the solvers by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cgfac_optax"
MAX_LINES = 60


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
  """Lines from the first statement after the docstring to the end of the function."""
  body = node.body
  first = body[0]
  if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
    if isinstance(first.value.value, str) and len(body) > 1:
      body = body[1:]
  return body[-1].end_lineno - body[0].lineno + 1


def _functions():
  for path in sorted(PACKAGE.rglob("*.py")):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        yield path.relative_to(PACKAGE.parent).as_posix(), node


def test_no_function_body_is_longer_than_sixty_lines():
  long = [
    f"{path}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
    for path, node in _functions()
    if _body_lines(node) > MAX_LINES
  ]
  assert not long, "functions over 60 lines: " + ", ".join(long)


def test_the_walk_counts_from_after_the_docstring():
  code = 'def f():\n  """Doc\n\n  more doc.\n  """\n  a = 1\n  return a\n'
  (node,) = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.FunctionDef)]
  assert _body_lines(node) == 2
  (node,) = [n for n in ast.walk(ast.parse("def g():\n  pass\n")) if isinstance(n, ast.FunctionDef)]
  assert _body_lines(node) == 1


# The modules around the solvers ask the records (attributes, functions, the tables in
# cgfac_optax._solvers) instead of branching on solver names: no name in a comparison or a lookup.
NAME_FREE = sorted(p.name for p in PACKAGE.glob("*.py"))  # every module outside _solvers/


def _compared_or_looked_up(tree: ast.AST):
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      for operand in (node.left, *node.comparators):
        yield from (operand, *getattr(operand, "elts", ()))
    elif isinstance(node, ast.Subscript):
      yield node.slice
    elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args:
      yield node.args[0]


@pytest.mark.parametrize("module", NAME_FREE)
def test_no_branching_on_solver_names_outside_the_records(module):
  from cgfac_optax._solvers import SOLVERS

  tree = ast.parse((PACKAGE / module).read_text())
  named = [
    f"line {n.lineno}: {n.value!r}"
    for n in _compared_or_looked_up(tree)
    if isinstance(n, ast.Constant) and n.value in SOLVERS
  ]
  assert not named, f"{module} branches on solver names: {named}"


def test_the_name_check_finds_a_comparison_and_a_lookup():
  tree = ast.parse('if solver == "cg" or SOLVERS["eigh"].exact or name in ("pcg", "x"): pass')
  found = {n.value for n in _compared_or_looked_up(tree) if isinstance(n, ast.Constant)}
  assert {"cg", "eigh", "pcg"} <= found
