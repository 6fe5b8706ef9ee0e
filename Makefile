# Two entry points: `make lm` (set up, then train the language model on Shakespeare)
# and `make test` (set up, then run the test suite). Everything else is `python -m ...`.
# Installs use constraints.txt, the tested set of exact versions; `make lock` refreshes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# torch, torchvision and torchaudio move together: `make lock` starts from these three.
TORCH_PINS ?= torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
LOCK_VENV := .lock-venv

.PHONY: setup test test-all test-cluster lm lint lock
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c constraints.txt
	$(PY) -m pip install -c constraints.txt '.[dev,slurm]'
	touch $@

test: setup
	$(PY) -m ruff check modules tasks data scripts tests
	$(PY) -m pytest
	$(PY) -m pytest -m slow

# A live single-node SLURM (installed with apt-get when missing, needs root): sweeps through
# the submitit launcher, ranks from SLURM, preemption and requeue.
test-cluster: setup
	$(PY) -m pytest -m cluster

test-all: setup
	$(PY) -m pytest -m "not gpu" --timeout=1800

lm: setup
	$(PY) -m tasks.lm $(ARGS)

lint: setup
	$(PY) -m ruff check modules tasks data scripts tests

# A new constraints.txt: the newest releases that pyproject.toml's ranges allow beside
# TORCH_PINS, installed into a fresh environment, kept only if the test suite passes there.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install '.[dev,slurm]' $(TORCH_PINS)
	$(LOCK_VENV)/bin/python -m pytest -q -x
	{ sed -n '1,3p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --all \
	    --exclude-editable | grep -iv '^attnkit'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt refreshed; run 'rm -rf $(VENV) && make test' to use it"
