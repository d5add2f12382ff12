# Entry points: `make demo` (set up, train five real tasks of three kinds, serve them), `make test` (the whole suite),
# `make test-fast` (the suite without the tests marked slow) and `make lint` (ruff on the whole repository).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# one pytest-xdist worker per core; a test module is one unit (tests/conftest.py says why and in which order)
XDIST := -n auto --dist loadfile --no-loadscope-reorder

.PHONY: venv demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the pinned CPU build, unless a torch (e.g. a CUDA build) is already there
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m training.demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(XDIST)

test-fast: venv
	$(PY) -m pytest -q $(XDIST) -m "not slow"

lint: venv
	$(PY) -m ruff check .
