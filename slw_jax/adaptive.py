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

The deadline is a floor (`Deadline`): no step is shorter than a linear ramp, by tokens consumed,
from `seqlen_start` to `seqlen_end` at `deadline_fraction` of `train_tokens` or of `train_steps`,
whichever comes first. A run that is never quiet takes that ramp (the slowest
schedule) and still ends at full length on its token budget; the LR decays by tokens as ever.

The lengths so far are the controller's change list [(first_step, seqlen), ...]; `walk` replays
it (with the floor) and projects the rest of the run as if nothing changes again, so the trainer
plans buckets, LRs, ETA and the stop step from a `pacing.Schedule` that it redraws after every
change. Nothing here touches JAX.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import json
import math

import numpy as np

from slw_jax import pacing
from slw_jax.config_lib import ConfigError

DECISIONS = ("grow", "hold", "backoff")
_MEDIAN_SERIES = ("grad_norm", "adam_nu_max")
MIN_MEDIAN_HISTORY = 10  # Values a rolling median needs before it judges (at most the window).


def ladder(c) -> list[int]:
  """The lengths an adaptive run can take, ascending: its start (rounded down to
  pacing.multiple), then every rung of pacing.multiple (compile.pad_multiple when set: each rung
  is then a whole bucket, no padding) above it, and seqlen_end."""
  p = c.pacing
  start = p.seqlen_start - p.seqlen_start % p.multiple
  rung = c.compile.pad_multiple or p.multiple
  lengths = [start] + list(range((start // rung + 1) * rung, p.seqlen_end + 1, rung))
  if lengths[-1] != p.seqlen_end:
    lengths.append(p.seqlen_end)
  return lengths


class Deadline:
  """The floor of every step's length: a linear ramp to seqlen_end by the deadline."""

  def __init__(self, c):
    fraction = c.pacing.adaptive.deadline_fraction
    # Each stop the run has, scaled: whichever ends the run first, the ramp ends by its share.
    self.token_span = c.train_tokens and fraction * c.train_tokens
    self.step_span = c.train_steps and fraction * c.train_steps
    self.rungs = ladder(c)  # A list: bisect on it is ~10x np.searchsorted on one value.
    self.start, self.end = self.rungs[0], self.rungs[-1]

  def floor(self, step: int, tokens_before: int) -> int:
    """The shortest length step `step` may take after `tokens_before` tokens (a rung)."""
    progress = max(tokens_before / self.token_span if self.token_span else 0.0,
                   step / self.step_span if self.step_span else 0.0)
    progress = min(1.0, progress)
    target = self.start + (self.end - self.start) * progress
    return self.rungs[bisect.bisect_right(self.rungs, target) - 1]


def initial_changes(c) -> list[list[int]]:
  return [[0, ladder(c)[0]]]


def fastest_changes(c) -> list[list[int]]:
  """The change list of a run quiet at every decision: one rung per decision."""
  every = c.pacing.adaptive.every_steps
  return initial_changes(c) + [[k * every + 1, rung] for k, rung in enumerate(ladder(c)) if k]


def walk(c, changes, stop_tokens=None, stop_steps=None) -> pacing.Schedule:
  """The schedule of `changes` (with the deadline's floor) until `stop_tokens` consumed or
  `stop_steps` taken; after the last change, nothing changes but the floor. Walked in runs of
  steps whose shape cannot change (`_steady_steps`): a GPT-2-sized run's ramp is 10^5 steps,
  and the trainer walks again after every change."""
  deadline, end = Deadline(c), c.pacing.seqlen_end
  runs, consumed, step, k = [], 0, 0, 0  # runs: (seqlen, batch_size, steps).
  while (stop_tokens is None or consumed < stop_tokens) and step != stop_steps:
    while k + 1 < len(changes) and changes[k + 1][0] <= step:
      k += 1
    seqlen = max(changes[k][1], deadline.floor(step, consumed))
    batch = pacing.batch_size_at(c, consumed)
    last_change = k + 1 == len(changes)
    if seqlen == end and batch == c.batch_size and last_change:
      break  # Constant from here on: the tail below.
    next_change = None if last_change else changes[k + 1][0]
    count = _steady_steps(c, deadline, seqlen, batch, step, consumed, next_change, stop_tokens,
                          stop_steps)
    runs.append((seqlen, batch, count))
    consumed += seqlen * batch * count
    step += count
    if step > pacing.MAX_PLAN_STEPS:
      pacing.too_long(c, step)
  runs.append((end, c.batch_size, _constant_tail(c.batch_size * end, consumed, step, stop_tokens,
                                                 stop_steps)))
  counts = [n for _, _, n in runs]
  return pacing.make_schedule(np.repeat(np.array([r[0] for r in runs], np.int64), counts),
                              np.repeat(np.array([r[1] for r in runs], np.int64), counts))


def _steady_steps(c, deadline: Deadline, seqlen: int, batch: int, step: int, consumed: int,
                  next_change, stop_tokens, stop_steps) -> int:
  """How many steps from `step` surely keep this (seqlen, batch): none of them reaches the next
  change, the floor's next rung, the stop, or a new batch size. A lower bound (1 near an
  edge, where the caller's step-by-step rule decides), never an overshoot."""
  if c.batch_warmup.start and consumed < c.batch_warmup.tokens:
    return 1  # The batch size moves with every step's tokens.
  per_step = seqlen * batch
  bounds = [_constant_tail(per_step, consumed, step, stop_tokens, stop_steps)]
  if next_change is not None:
    bounds.append(next_change - step)
  if seqlen < deadline.end:  # The floor stays below the next rung while progress is below this.
    rung = deadline.rungs[bisect.bisect_right(deadline.rungs, seqlen)]
    progress = (rung - deadline.start) / (deadline.end - deadline.start)
    if deadline.token_span:  # The margin of 1 step keeps float rounding on the safe side.
      bounds.append(math.floor((progress * deadline.token_span - consumed) / per_step) - 1)
    if deadline.step_span:
      bounds.append(math.floor(progress * deadline.step_span - step) - 1)
  return max(1, min(bounds))


def _constant_tail(per_step: int, consumed: int, step: int, stop_tokens, stop_steps) -> int:
  """Steps of `per_step` tokens from (`step`, `consumed`) to the first stop reached."""
  counts = []
  if stop_tokens is not None:
    counts.append(max(0, -(-(stop_tokens - consumed) // per_step)))
  if stop_steps is not None:
    counts.append(max(0, stop_steps - step))
  return min(counts)


def check_deadline(c):
  """Raises ConfigError when the deadline is past the run (the slowest schedule never reaches
  seqlen_end) or leaves no decision to take (it reaches it by the first decision)."""
  every, fraction = c.pacing.adaptive.every_steps, c.pacing.adaptive.deadline_fraction
  slowest = walk(c, initial_changes(c), c.train_tokens, c.train_steps)
  reached = np.nonzero(slowest.seqlen >= c.pacing.seqlen_end)[0]
  if not len(reached):
    raise ConfigError(
        f"config.pacing.adaptive.deadline_fraction={fraction!r} is invalid: the deadline's ramp "
        f"does not reach seqlen_end={c.pacing.seqlen_end} within the run's "
        f"{slowest.num_steps} steps (its last steps are {int(slowest.seqlen[-1])} long); "
        "lower it")
  if reached[0] <= every + 1:
    raise ConfigError(
        f"config.pacing.adaptive.deadline_fraction={fraction!r} is invalid: it reaches "
        f"seqlen_end={c.pacing.seqlen_end} at step {reached[0]}, before the first decision "
        f"applies (step {every + 1}, pacing.adaptive.every_steps={every}); raise it (below 1) "
        "or lower every_steps")


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
    self.rungs = ladder(c)
    self.changes = initial_changes(c)
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
