"""Trainers that behave as if a SIGTERM came while a chosen step runs (in-process stop tests)."""

from slw_jax import trainer


class StopAt(trainer.Trainer):
  """Behaves like a SIGTERM arriving while step `stop_after` runs (the loop then stops after
  the step in flight, which may be the next one, and saves)."""

  def __init__(self, *args, stop_after: int = 5, **kwargs):
    super().__init__(*args, **kwargs)
    self.stop_after = stop_after

  def _finish_step(self, t, metrics):
    if t == self.stop_after:
      self.stop.signal = "SIGTERM"
    return super()._finish_step(t, metrics)
