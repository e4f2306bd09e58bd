# `make train` and `make test` set everything up on a fresh machine (Python 3.10+ as python3).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
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

# The test-only packages (pytest, torch and transformers for the GPT-2 conversion tests).
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

# Trains the tiny config on the default corpus (prepared on first use); resumes if interrupted.
RUN ?= runs/tiny
train: setup
	$(PY) -m slw_jax.main --config=configs/tiny.py --workdir=$(RUN)

clean:
	rm -rf $(VENV) .pytest_cache
