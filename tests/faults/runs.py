"""Runs of `slw_jax.main` in a subprocess for the fault tests (through driver.py, which can
inject faults), on one CPU device: the 8 test devices cost ~70 ms a step on 2 cores."""

import os
import subprocess
import sys

from conftest import REPO, TEST_RUN

DRIVER = os.path.join(os.path.dirname(__file__), "driver.py")
# 120 steps: long enough to stop at a chosen moment. Both budgets given: the command line
# cannot unset tiny.py's train_tokens. Two poisoned batches (steps 25 and 60; 4 windows a
# step) make two rollbacks.
STEPS = 120
LONG_RUN = {"train_steps": STEPS, "train_tokens": 10**9, "checkpoint.every_steps": 5,
            "eval.every_steps": 40, "log.print_every_steps": 40, "mesh.data": 1,
            "mesh.tensor": 1, "monitor.action": "rollback"}
POISONED = {"SLW_FAULT_POISON": f"{25 * 4},{60 * 4}"}
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def command(make_config, workdir, **overrides) -> list[str]:
  """The command line of LONG_RUN (plus `overrides`, a__b=v) on the test corpus in `workdir`."""
  c = make_config()
  values = {**TEST_RUN, **LONG_RUN, "data.source": c.data.source, "data.dir": c.data.dir,
            "compile.cache_dir": c.compile.cache_dir,
            **{k.replace("__", "."): v for k, v in overrides.items()}}
  return [sys.executable, DRIVER, "--config=configs/tiny.py", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in values.items() if v is not None)]


def start(argv, env=None, **popen) -> subprocess.Popen:
  return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), **ONE_DEVICE,
                                          **POISONED, **(env or {})}, **popen)


def finish(process, timeout=240) -> str:
  output, _ = process.communicate(timeout=timeout)
  return output


def run(argv, env=None) -> str:
  """Runs to the end; fails the test unless the run exits 0."""
  process = start(argv, env)
  output = finish(process)
  assert process.returncode == 0, output
  return output
