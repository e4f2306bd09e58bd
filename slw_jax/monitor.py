"""Stability monitor: loss ratio, Adam-variance spikes, the paper's correlations, actions.

Loss ratio = this step's training loss / min over all previous steps' losses (the paper's
Table 1). The monitor counts steps above `monitor.ratio_threshold`, keeps the max ratio, counts
spikes of `adam_nu_max` above `spike_factor` x its rolling median, and accumulates the sums
for the Pearson correlation of the loss ratio with `adam_nu_l1` and `adam_nu_max` (Table 3).
Its state is small (no per-step history beyond the rolling window) and is checkpointed.

A bad step (`is_bad`) has a non-finite loss, a non-finite gradient norm (a finite loss does
not prove finite gradients), or a loss ratio above `monitor.skip_ratio`.

It decides, but does not act: `observe` returns "rollback" when a bad step is seen under
`monitor.action=rollback`, and "stop" once `monitor.max_bad_in_a_row` consecutive steps were
bad (whatever the action: a run that only produces NaN must not spend its token budget); the
trainer restores and skips data, or stops. `skip` happens inside the step.
"""

from __future__ import annotations

import collections
import math

import numpy as np
from scipy import stats as scipy_stats

_PAIRS = ("adam_nu_l1", "adam_nu_max")


def is_bad(loss, grad_norm, ratio, skip_ratio: float, xp=np):
  """Whether a step is bad: its loss or its gradients' norm is not finite (a finite loss can
  still have inf/NaN gradients, which would turn every parameter into NaN), or its loss ratio
  exceeds `skip_ratio`. The one definition of the rule: the train step applies it on the
  device (`xp=jax.numpy`, to skip the update), the monitor on the host (numpy, on the values
  fetched), so the two can never disagree about a step."""
  finite = xp.isfinite(loss) & xp.isfinite(grad_norm)
  return xp.logical_not(finite) | (ratio > skip_ratio)


_COUNTERS = ("steps", "unstable_steps", "skipped_steps", "bad_steps", "nu_spikes", "rollbacks",
             "max_ratio", "bad_in_a_row", "spike_steps")
# SpikeScore as OLMo-core's StabilityMonitorCallback defines it ("SpikeScore (total)"): a step
# spikes when its loss or its gradient norm is above the mean of the previous SPIKE_WINDOW
# values of that series by more than SPIKE_SIGMAS (population) standard deviations (no spike
# before a full window, or when the std is below 1e-10); the score is spiking steps over all
# steps, reported from SPIKE_WINDOW steps on. A non-finite value is no spike there either; we
# keep it out of the window (OLMo-core's would then hold a NaN and see no spike again).
SPIKE_WINDOW, SPIKE_SIGMAS = 128, 6.0
_SPIKE_SERIES = ("loss", "grad_norm")


class StabilityMonitor:

  def __init__(self, m, state: dict | None = None):
    self.cfg = m
    self.steps = 0
    self.unstable_steps = 0
    self.skipped_steps = 0
    self.bad_steps = 0
    self.nu_spikes = 0
    self.rollbacks = 0
    self.max_ratio = 0.0
    self.bad_in_a_row = 0  # Consecutive bad steps up to the last one observed.
    self.spike_steps = 0
    self.recent = {k: collections.deque(maxlen=SPIKE_WINDOW) for k in _SPIKE_SERIES}
    self.recent_nu_max: collections.deque = collections.deque(maxlen=m.spike_window)
    # Running sums for Pearson r of loss_ratio (x) against each nu statistic (y).
    self.sums = {k: {"n": 0, "x": 0.0, "y": 0.0, "xx": 0.0, "yy": 0.0, "xy": 0.0} for k in _PAIRS}
    self.events: list[dict] = []
    if state:
      self.load_state(state)

  def bad_steps_stop(self, step: int, saved_steps: list[int], where: str) -> str:
    """Why the run stops after monitor.max_bad_in_a_row bad steps in a row (up to `step`),
    naming the newest of the `saved_steps` checkpoints (in `where`) saved before them (none is
    saved during a streak of applied bad updates)."""
    m, count = self.cfg, self.bad_in_a_row
    first_bad = step - count + 1  # Consecutive in the data; a rollback may have rewound steps.
    clean = [k for k in saved_steps if m.action == "skip" or k <= first_bad]
    newest = f"the newest before them: step {max(clean)}" if clean else "none before them"
    return (f"the last {count} steps (up to step {step}) were all bad (monitor.max_bad_in_a_row="
            f"{m.max_bad_in_a_row}: non-finite loss or gradient norm, or loss ratio above "
            f"monitor.skip_ratio={m.skip_ratio}); stopped with the checkpoints kept in {where} "
            f"({newest}): lower optim.lr or lengthen pacing.duration_steps, then resume")

  def observe(self, step: int, metrics: dict) -> str | None:
    """Takes one step's metrics; returns "stop" when the run must stop (too many bad steps in
    a row), "rollback" when the trainer must roll back, else None."""
    self.steps += 1
    ratio, loss = float(metrics["loss_ratio"]), float(metrics["loss"])
    grad_norm = float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(ratio):
      self.max_ratio = max(self.max_ratio, ratio)
      self.unstable_steps += ratio > self.cfg.ratio_threshold
      self._accumulate(ratio, metrics)
    self._check_nu_spike(step, float(metrics["adam_nu_max"]))
    self._score_spikes({"loss": loss, "grad_norm": grad_norm})
    if not bool(is_bad(loss, grad_norm, ratio, self.cfg.skip_ratio)):
      self.bad_in_a_row = 0
      return None
    self.bad_steps += 1
    self.bad_in_a_row += 1
    values = {"loss": loss, "loss_ratio": ratio, "grad_norm": grad_norm}
    if bool(metrics.get("skipped", False)):
      self.skipped_steps += 1
      self.event(step, "skip", **values)
    elif self.cfg.action != "rollback":
      self.event(step, "unstable", **values)
    if self.bad_in_a_row >= self.cfg.max_bad_in_a_row:
      self.event(step, "stop", bad_in_a_row=self.bad_in_a_row)
      return "stop"
    if self.cfg.action == "rollback" and not metrics.get("skipped", False):
      return "rollback"
    return None

  def _accumulate(self, ratio: float, metrics: dict):
    if ratio == 0.0:  # The first step has no previous loss: no ratio to correlate.
      return
    for key in _PAIRS:
      y = float(metrics[key])
      if not math.isfinite(y):
        continue
      s = self.sums[key]
      s["n"] += 1
      s["x"] += ratio
      s["y"] += y
      s["xx"] += ratio * ratio
      s["yy"] += y * y
      s["xy"] += ratio * y

  def _score_spikes(self, values: dict):
    spiked = False
    for key, value in values.items():
      window = self.recent[key]
      if len(window) == SPIKE_WINDOW and math.isfinite(value):
        history = np.asarray(window)
        std = history.std()
        spiked |= bool(std >= 1e-10 and value > history.mean() + SPIKE_SIGMAS * std)
      if math.isfinite(value):
        window.append(value)
    self.spike_steps += spiked

  def spike_score(self) -> float | None:
    """OLMo-core's SpikeScore of the steps so far (None before SPIKE_WINDOW steps)."""
    return self.spike_steps / self.steps if self.steps >= SPIKE_WINDOW else None

  def _check_nu_spike(self, step: int, nu_max: float):
    window = self.recent_nu_max
    if len(window) >= min(10, window.maxlen):
      median = float(np.median(window))
      if median > 0 and nu_max > self.cfg.spike_factor * median:
        self.nu_spikes += 1
        self.event(step, "nu_spike", adam_nu_max=nu_max, rolling_median=median)
    if math.isfinite(nu_max):
      window.append(nu_max)

  def event(self, step: int, kind: str, **values):
    """Records an action or observation; the trainer writes these to events.jsonl."""
    self.events.append({"step": int(step), "event": kind, **values})

  def pop_events(self) -> list[dict]:
    events, self.events = self.events, []
    return events

  def pearson(self, key: str) -> dict:
    """Pearson r and two-sided p-value of loss ratio vs `key` over the steps seen so far."""
    s = self.sums[key]
    n = s["n"]
    if n < 3:
      return {"r": None, "p": None, "n": n}
    cov = s["xy"] - s["x"] * s["y"] / n
    var_x, var_y = s["xx"] - s["x"] ** 2 / n, s["yy"] - s["y"] ** 2 / n
    if var_x <= 0 or var_y <= 0:
      return {"r": None, "p": None, "n": n}
    r = max(-1.0, min(1.0, cov / math.sqrt(var_x * var_y)))
    if abs(r) == 1.0:
      return {"r": r, "p": 0.0, "n": n}
    t = r * math.sqrt((n - 2) / (1 - r * r))
    return {"r": r, "p": float(2 * scipy_stats.t.sf(abs(t), n - 2)), "n": n}

  def summary(self) -> dict:
    return {
        "steps": self.steps, "ratio_threshold": self.cfg.ratio_threshold,
        "unstable_steps": self.unstable_steps,
        "unstable_fraction": self.unstable_steps / self.steps if self.steps else 0.0,
        "max_loss_ratio": self.max_ratio, "bad_steps": self.bad_steps,
        "skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks,
        "bad_in_a_row": self.bad_in_a_row, "spike_score": self.spike_score(),
        "spike_steps": self.spike_steps,
        "adam_nu_max_spikes": self.nu_spikes,
        "pearson_loss_ratio_vs_adam_nu_l1": self.pearson("adam_nu_l1"),
        "pearson_loss_ratio_vs_adam_nu_max": self.pearson("adam_nu_max"),
    }

  def state(self) -> dict:
    """JSON-ready state for checkpoints: a copy (an asynchronous save serializes it while the
    run goes on; the live sums would reach the checkpoint with later steps in them)."""
    return {**{k: getattr(self, k) for k in _COUNTERS}, "recent_nu_max": list(self.recent_nu_max),
            "recent": {k: list(v) for k, v in self.recent.items()},
            "sums": {k: dict(v) for k, v in self.sums.items()}}

  def load_state(self, state: dict):
    for key in _COUNTERS:  # A checkpoint from before a counter existed: it counts from 0.
      setattr(self, key, state.get(key, 0))
    self.recent_nu_max.clear()
    self.recent_nu_max.extend(state["recent_nu_max"])
    for key, window in self.recent.items():
      window.clear()
      window.extend(state.get("recent", {}).get(key, []))
    self.sums = {k: dict(v) for k, v in state["sums"].items()}
