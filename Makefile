# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-oldest lint docs benchmarks-page wheel format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.demo-installed $(VENV)/.docs-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python benchmarks/demo.py $(ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The HTML site in docs/_build/html; any warning fails the build (-n: every cross-reference
# must resolve, see docs/conf.py). -E rereads every page, so docstring changes always show.
docs: $(VENV)/.docs-installed
	$(BIN)/python -m sphinx -E -W --keep-going -n -q -b html docs docs/_build/html

# docs/benchmarks_results.md and its figures, from the JSON in benchmarks/results/ (run after a
# benchmark; it names the expected results that are missing).
benchmarks-page: $(VENV)/.docs-installed
	$(BIN)/python docs/benchmarks_page.py

test: lint docs
	$(BIN)/python -m pytest -n 2 cgfac_optax tests

# The tests at the oldest versions pyproject.toml allows (every dependency at its lower bound), in
# a venv of their own; TESTS= narrows the run.
OLDEST := .venv-oldest
OLDEST_PINS = $(shell sed -n 's/^  "\(jax\|jaxlib\|optax\|flax\|chex\)>=\([0-9.]*\).*/\1==\2/p' pyproject.toml)

$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -e '.[dev]' $(OLDEST_PINS)
	touch $@

test-oldest: $(OLDEST)/.installed
	$(OLDEST)/bin/python -m pip list 2>/dev/null | grep -E '^(jax|jaxlib|optax|flax|chex) '
	$(OLDEST)/bin/python -m pytest -n 2 $(or $(TESTS),cgfac_optax tests)

# An sdist and a wheel in dist/, built in an isolated environment as a package index gets them.
wheel: $(VENV)/.dev-installed
	$(BIN)/python -m build --outdir dist .

format: $(VENV)/.dev-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) $(OLDEST) build dist docs/_build *.egg-info
