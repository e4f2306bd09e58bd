"""Closed-loop sequence length warmup: `pacing.kind=adaptive` (docs/adaptive-pacing.md).

The run starts at `pacing.seqlen_start` and climbs a ladder of lengths (`ladder`: every
multiple of `pacing.multiple` up to `seqlen_end`, or the bucket lengths of
`compile.pad_multiple`) one rung at a time. Every `pacing.adaptive.every_steps` steps the
`Controller` reads the window of steps just finished, from the metric rows the trainer already
fetches for its log (no extra device sync), and decides:

- grow one rung when the window is quiet;
- hold on an excursion: a loss ratio above `max_loss_ratio`, a gradient norm above
  `grad_norm_factor` x its rolling median, or `adam_nu_max` above `nu_max_factor` x its rolling
  median (the monitor's spike rule);
- on a spike (a non-finite value, or a loss ratio above `monitor.skip_ratio`: a bad step), back
  off one rung with `backoff`, else hold.

The decision read after step d - 1 (d a multiple of `every_steps`) applies from step d + 1:
with one step in flight, step d may already be running when step d - 1's metrics arrive, and
the rule must not depend on whether it is (an evaluation or a save settles it sooner). So a
decision is a pure function of the metric rows and the controller's state: the same on every
process (the rows hold global means) and after a resume (the state is in every checkpoint).

The deadline is a floor (`pacing.Deadline`): no step is shorter than a linear ramp, by tokens
consumed, from `seqlen_start` to `seqlen_end` at `deadline_fraction` of `train_tokens` or of
`train_steps`, whichever comes first. A run that is never quiet takes that ramp (the slowest
schedule) and still ends at full length on its token budget; the LR decays by tokens as ever.

The lengths so far are the controller's change list [(first_step, seqlen), ...];
`pacing.walk_changes` replays it (with the floor) and projects the rest of the run as if nothing
changes again, so the trainer plans buckets, LRs, ETA and the stop step from a `pacing.Schedule`
that it redraws after every change. Nothing here touches JAX.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math

import numpy as np

from slw_jax import pacing

DECISIONS = ("grow", "hold", "backoff")
_MEDIAN_SERIES = ("grad_norm", "adam_nu_max")
MIN_MEDIAN_HISTORY = 10  # Values a rolling median needs before it judges (at most the window).


def _median_ratio(value: float, history) -> float | None:
  """value / the median of `history`, once it holds enough values (None before)."""
  if len(history) < min(MIN_MEDIAN_HISTORY, history.maxlen):
    return None
  median = float(np.median(history))
  return value / median if median > 0 else None


def _fresh_window() -> dict:
  return {"steps": 0, "max_loss_ratio": 0.0, "max_grad_norm_ratio": 0.0,
          "max_nu_max_ratio": 0.0, "spikes": 0}


class Controller:
  """Decides the length of an adaptive run from its metric rows; its state is checkpointed."""

  def __init__(self, c, state: dict | None = None):
    self.cfg, self.skip_ratio = c.pacing.adaptive, c.monitor.skip_ratio
    self.rungs = pacing.ladder(c)
    self.changes = pacing.initial_changes(c)
    self.recent = {k: collections.deque(maxlen=self.cfg.median_window) for k in _MEDIAN_SERIES}
    self.window = _fresh_window()
    self.decisions = dict.fromkeys(DECISIONS, 0)
    if state:
      self.load_state(state)

  def observe(self, step: int, row: dict) -> dict | None:
    """Takes step `step`'s metric row; at the end of a window returns the decision's event
    (its change, if any, is in `changes` from step `step + 2`), else None."""
    self._accumulate(row)
    if (step + 1) % self.cfg.every_steps:
      return None
    window, self.window = self.window, _fresh_window()
    seqlen = int(row["seqlen"])
    if seqlen >= self.rungs[-1]:
      return None  # Full length: nothing left to decide.
    decision = self._decide(window)
    new = {"grow": self.next_rung(seqlen), "hold": self.current,
           "backoff": self.previous_rung(seqlen)}[decision]
    self.decisions[decision] += 1
    if new != self.current:
      self.changes.append([step + 2, int(new)])
    return {"step": int(step), "event": "pacing", "decision": decision, "seqlen": seqlen,
            "new_seqlen": seqlen if decision == "hold" else int(new),  # The floor may raise it.
            "from_step": int(step) + 2, **{k: v for k, v in window.items() if k != "steps"}}

  def next_rung(self, seqlen: int) -> int:
    return next((r for r in self.rungs if r > seqlen), self.rungs[-1])

  def previous_rung(self, seqlen: int) -> int:
    return next((r for r in reversed(self.rungs) if r < seqlen), self.rungs[0])

  def digest(self) -> int:
    """A 63-bit digest of the changes so far (processes compare theirs)."""
    return int.from_bytes(hashlib.sha256(json.dumps(self.changes).encode()).digest()[:8],
                          "little") >> 1

  @property
  def current(self) -> int:
    """The controller's length from its last change on (the floor may run above it)."""
    return self.changes[-1][1]

  def _decide(self, window: dict) -> str:
    if window["spikes"]:
      return "backoff" if self.cfg.backoff else "hold"
    quiet = (window["max_loss_ratio"] <= self.cfg.max_loss_ratio
             and window["max_grad_norm_ratio"] <= self.cfg.grad_norm_factor
             and window["max_nu_max_ratio"] <= self.cfg.nu_max_factor)
    return "grow" if quiet else "hold"

  def _accumulate(self, row: dict):
    w = self.window
    w["steps"] += 1
    loss, ratio = float(row["loss"]), float(row["loss_ratio"])
    values = {k: float(row[k]) for k in _MEDIAN_SERIES}
    finite = all(math.isfinite(v) for v in (loss, ratio, *values.values()))
    if math.isfinite(ratio):
      w["max_loss_ratio"] = max(w["max_loss_ratio"], ratio)
    w["spikes"] += (not finite) or ratio > self.skip_ratio
    for key, field in (("grad_norm", "max_grad_norm_ratio"), ("adam_nu_max", "max_nu_max_ratio")):
      value, history = values[key], self.recent[key]
      if not math.isfinite(value):
        continue  # Non-finite values stay out of the medians (and counted as spikes above).
      against = _median_ratio(value, history)
      if against is not None:
        w[field] = max(w[field], against)
      history.append(value)

  def summary(self) -> dict:
    return {"kind": "adaptive", "seqlen": self.current, "decisions": dict(self.decisions),
            "changes": [list(c) for c in self.changes]}

  def state_after_fixed(self, fixed, step: int) -> dict:
    """The state that continues, at `step`, a run of the `fixed` schedule (a pacing.Schedule:
    resumed as adaptive under --allow_schedule_change): from the rung at or below the length
    it had reached, not from the start."""
    reached = int(fixed.seqlen[max(step - 1, 0)]) if step else 0
    rungs = [r for r in self.rungs if r <= reached] or self.rungs[:1]
    grown = [[step, rungs[-1]]] if rungs[-1] > rungs[0] else []
    return {**self.state(), "changes": [[0, rungs[0]]] + grown}

  def state(self) -> dict:
    """JSON-ready copy (an asynchronous save serializes it while the run goes on)."""
    return {"changes": [list(c) for c in self.changes], "window": dict(self.window),
            "recent": {k: list(v) for k, v in self.recent.items()},
            "decisions": dict(self.decisions)}

  def load_state(self, state: dict):
    self.changes = [[int(s), int(L)] for s, L in state["changes"]]
    self.window = dict(state["window"])
    for key, history in self.recent.items():
      history.clear()
      history.extend(state["recent"][key])
    self.decisions = {**dict.fromkeys(DECISIONS, 0), **state["decisions"]}
