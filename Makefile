# `make train` and `make test` set everything up on a fresh machine (Python 3.10+ as python3).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup test train plan clean

setup: $(STAMP)

# Reinstalls only when a requirements file or the package metadata changed.
$(STAMP): requirements.txt requirements-train.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# Until the trainer lands: prepares the default corpus (once) and prints the tiny run's plan.
train: setup
	$(PY) -m slw_jax.prepare --config=configs/tiny.py
	$(PY) -m slw_jax.plan --config=configs/tiny.py --every=25

clean:
	rm -rf $(VENV) .pytest_cache
