# `make train` and `make test` set everything up on a fresh machine (Python 3.10+ as python3).
# On accelerator machines: `make setup ACCEL=cuda` (NVIDIA, CUDA 12 wheels) or `ACCEL=tpu`
# installs the trainer with that JAX plugin and no TensorFlow; `make train ACCEL=cuda` trains.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make setup ACCEL=cuda` remembers its choice in .venv/.accel: a later plain `make train`
# keeps the CUDA wheels instead of installing the CPU stack over them.
ACCEL ?= $(shell cat $(VENV)/.accel 2>/dev/null || echo cpu)
export TF_CPP_MIN_LOG_LEVEL ?= 3

ACCELS := cpu cuda tpu
ifneq ($(words $(ACCEL)),1)
$(error ACCEL=$(ACCEL) is invalid: must be one of $(ACCELS))
endif
ifeq ($(filter $(ACCEL),$(ACCELS)),)
$(error ACCEL=$(ACCEL) is invalid: must be one of $(ACCELS))
endif
# cpu: everything (data preparation with TensorFlow, and the tests); cuda/tpu: the trainer.
REQUIREMENTS_cpu := requirements.txt
REQUIREMENTS_cuda := requirements-cuda.txt
REQUIREMENTS_tpu := requirements-tpu.txt
REQUIREMENTS := $(REQUIREMENTS_$(ACCEL))
STAMP := $(VENV)/.installed-$(ACCEL)
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup test test-fast train clean

setup: $(STAMP)
	@echo $(ACCEL) > $(VENV)/.accel

# Reinstalls only when a requirements file or the package metadata changed.
$(VENV)/.installed-%: requirements.txt requirements-train.txt requirements-cuda.txt \
		requirements-tpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(REQUIREMENTS_$*)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The test-only packages (pytest, torch and transformers for the GPT-2 conversion tests).
$(TEST_STAMP): $(VENV)/.installed-cpu requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $(TEST_STAMP)

# Tests always run on the CPU backend (8 simulated devices, tests/conftest.py), even on a GPU
# machine; only this target forces the CPU.
test: export JAX_PLATFORMS := cpu
test: $(TEST_STAMP)
	$(PY) -m pytest -q --durations=15 tests

# The unit tier, for the inner loop (at most 3 minutes on a 2-core machine): every test but
# those marked slow, fault or multiprocess (tests/conftest.py). CI runs `make test`, never this.
test-fast: export JAX_PLATFORMS := cpu
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q --durations=10 -m "not slow and not fault and not multiprocess" tests

# Trains the tiny config on the default corpus (prepared on first use); resumes if interrupted.
# Uses the accelerator JAX finds; with ACCEL=cpu wheels that is the CPU.
RUN ?= runs/tiny
# compile.pad_multiple=64: what `plan --compile_estimate` recommends for the tiny run on a
# 2-core CPU (4 buckets instead of 8; benchmarks/RESULTS.md, issue 12).
train: setup
	$(PY) -m slw_jax.main --config=configs/tiny.py --workdir=$(RUN) --config.compile.pad_multiple=64

clean:
	rm -rf $(VENV) .pytest_cache
