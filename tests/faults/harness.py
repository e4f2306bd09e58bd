"""Runs an entry point's `main(argv)` in this process, as `python -m` would run it.

A subprocess costs seconds of imports per call; in-process calls cost milliseconds, but absl's
flags are process-global, so each call starts from fresh flag values.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from absl import flags


@dataclasses.dataclass
class Exit:
  code: int
  seconds: float


def reset_flags():
  """Forgets the previous call's flag values, and the per-field flags ml_collections defined
  for its --config.a.b=v overrides (defining one again would be an error)."""
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def call(main, argv: list[str]) -> Exit:
  """Calls `main(argv)`; returns its exit status (0 when it returns) and wall time. Any other
  exception propagates: for a command line, a traceback is a failure."""
  reset_flags()
  saved, sys.argv = sys.argv, list(argv)  # ml_collections reads the overrides from sys.argv.
  start = time.perf_counter()
  try:
    main(list(argv))
    code = 0
  except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
  finally:
    sys.argv = saved
    reset_flags()
  return Exit(code, time.perf_counter() - start)
