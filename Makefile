# Two entry points: `make lm` (set up, then train the language model on Shakespeare)
# and `make test` (set up, then run the test suite). Everything else is `python -m ...`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup test test-all lm lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

test: setup
	$(PY) -m ruff check modules tasks data scripts tests
	$(PY) -m pytest
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "not gpu" --timeout=1800

lm: setup
	$(PY) -m tasks.lm $(ARGS)

lint: setup
	$(PY) -m ruff check modules tasks data scripts tests
