"""`python tests/faults/driver.py <slw_jax.main flags>`: slw_jax.main with faults injected
from the environment, for the fault-injection tests (never used by a real run).

SLW_FAULT_POISON: comma-separated loader positions whose batches get a NaN loss.
SLW_FAULT_KILL: where the process SIGKILLs itself:
  after_journal   in a rollback, once its journal is written (nothing deleted yet);
  before_clear    once the first checkpoint after a rollback is on disk, before the rollback's
                  journal is removed.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import poison  # noqa: E402  pylint: disable=g-import-not-at-top
from slw_jax import input_pipeline, main, resume  # noqa: E402


def _die_after(function):
  def dying(*args, **kwargs):
    result = function(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
    return result
  return dying


def _die_before(function):
  def dying(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
    return function(*args, **kwargs)
  return dying


def inject():
  positions = os.environ.get("SLW_FAULT_POISON")
  if positions:
    input_pipeline.Loader.batch_at = poison(input_pipeline.Loader.batch_at)
    input_pipeline.Loader.batch_at.positions.update(int(p) for p in positions.split(","))
  kill = os.environ.get("SLW_FAULT_KILL")
  if kill == "after_journal":
    resume.write_journal = _die_after(resume.write_journal)
  elif kill == "before_clear":
    resume.clear_journal = _die_before(resume.clear_journal)
  elif kill:
    raise SystemExit(f"error: SLW_FAULT_KILL={kill!r} is not after_journal or before_clear")


if __name__ == "__main__":
  inject()
  main.main()
