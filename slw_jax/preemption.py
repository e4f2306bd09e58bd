"""Stopping on a signal: SIGTERM/SIGINT end the run after the step in flight, with a save that
must finish within a deadline (checkpoint.preemption_timeout_s) or is abandoned.

A preempted machine is killed a grace period after its SIGTERM (Kubernetes, SLURM's KillWait,
spot VMs: 30 s by default): a save still running then would be cut anyway, so the process
exits on time instead and the previous checkpoint stays the newest.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

import jax

from slw_jax import distributed


class StopOnSignal:
  """Within the block, SIGTERM and SIGINT call `stop(name)` (the loop then stops after the step
  in flight and saves); a second SIGINT raises KeyboardInterrupt at once. With several
  processes SIGTERM stays JAX's preemption notice (distributed.stop_agreed)."""

  def __init__(self, stop: Callable[[str], None]):
    self.stop, self.previous, self.received = stop, {}, False

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.received = True
    self.stop(signal.Signals(signum).name)

  def __enter__(self):
    signums = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    for signum in signums:
      self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)


def finished_within(wait: Callable[[], None], seconds: float) -> bool:
  """Runs `wait()` (e.g. for the last save) for at most `seconds`; False when it has not
  returned by then (it goes on in a daemon thread, which the process's exit ends). An error
  `wait` raises in time is raised here."""
  failed = []

  def waiting():
    try:
      wait()
    except Exception as error:  # pylint: disable=broad-except  # Raised below, in the caller.
      failed.append(error)
  waiter = threading.Thread(target=waiting, daemon=True, name="slw_jax-final-save")
  waiter.start()
  waiter.join(max(seconds, 0.0))
  if failed:
    raise failed[0]
  return not waiter.is_alive()


class Stop:
  """A run's stop request and its deadline: the signal received (`signal`, None until one
  is), when (`time`, monotonic), and the step before which every process stops (several
  processes agree on it: `agreed`). The final save must end `timeout_s` after the signal."""

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self.signal: str | None = None
    self.time: float | None = None
    self._before: int | None = None  # Kept: a rollback trains back up to it.

  def on_signal(self, name: str):
    self.signal, self.time = name, time.monotonic()  # The deadline counts from here.
    print(f"{name}: finishing the current step and saving", flush=True)

  def agreed(self, step: int) -> bool:
    """Whether to stop before launching `step`. With several processes, all stop before the
    same step, so a signal that reached any one of them stops every one."""
    if jax.process_count() == 1:
      return self.signal is not None
    if self._before is None and distributed.stop_agreed(self.signal is not None):
      self._before = step
    if self._before is None or step < self._before:
      return False
    self.signal = self.signal or "signal to one of the processes"
    self.time = self.time or time.monotonic()
    return True

  def seconds_left(self) -> float:
    """Until the deadline; infinite when no stop was asked."""
    if self.time is None:
      return float("inf")
    return self.time + self.timeout_s - time.monotonic()

  def waited_in_time(self, wait: Callable[[], None]) -> bool:
    """Runs `wait()` (the started saves); after a stop only until the deadline. False: it was
    abandoned (a save's temporary directory is never read as a checkpoint)."""
    if self.signal is None or self.time is None:
      wait()
      return True
    return finished_within(wait, self.seconds_left())
