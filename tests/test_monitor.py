"""Stability monitor: loss-ratio counts, Pearson statistics, nu spikes, state round trip."""

import json

import numpy as np
import pytest
from ml_collections import config_dict
from scipy import stats

from slw_jax import monitor


def _cfg(**overrides):
  values = dict(ratio_threshold=1.2, action="log", skip_ratio=2.0, max_rollbacks=3,
                spike_window=20, spike_factor=2.0)
  values.update(overrides)
  return config_dict.FrozenConfigDict(values)


def _metrics(loss, ratio, l1=1.0, nu_max=0.1, skipped=False):
  return {"loss": loss, "loss_ratio": ratio, "adam_nu_l1": l1, "adam_nu_max": nu_max,
          "skipped": skipped}


def test_counts_max_ratio_and_pearson_match_scipy():
  rng = np.random.default_rng(0)
  ratios = 1 + np.abs(rng.normal(0, 0.15, 200))
  l1 = 5 + 3 * ratios + rng.normal(0, 0.2, 200)
  nu_max = 0.1 + rng.uniform(0, 0.01, 200)
  m = monitor.StabilityMonitor(_cfg())
  m.observe(0, _metrics(5.0, 0.0))  # First step: no previous loss, not correlated.
  for i, (r, a, b) in enumerate(zip(ratios, l1, nu_max), start=1):
    m.observe(i, _metrics(4.0, float(r), float(a), float(b)))
  s = m.summary()
  assert s["steps"] == 201 and s["unstable_steps"] == int((ratios > 1.2).sum())
  assert s["max_loss_ratio"] == pytest.approx(ratios.max())
  expected = stats.pearsonr(ratios, l1)
  got = s["pearson_loss_ratio_vs_adam_nu_l1"]
  assert got["r"] == pytest.approx(expected.statistic, rel=1e-6)
  assert got["p"] == pytest.approx(expected.pvalue, rel=1e-4) and got["n"] == 200
  assert s["pearson_loss_ratio_vs_adam_nu_max"]["r"] == pytest.approx(
      stats.pearsonr(ratios, nu_max).statistic, rel=1e-6)


def test_nu_spike_is_relative_to_rolling_median():
  m = monitor.StabilityMonitor(_cfg())
  for step in range(30):
    m.observe(step, _metrics(3.0, 1.0, nu_max=0.1 + 0.001 * (step % 3)))
  m.observe(30, _metrics(3.0, 1.0, nu_max=0.35))
  assert m.summary()["adam_nu_max_spikes"] == 1
  assert m.pop_events() == [{"step": 30, "event": "nu_spike", "adam_nu_max": 0.35,
                             "rolling_median": pytest.approx(0.101)}]


def test_bad_steps_by_action():
  logging = monitor.StabilityMonitor(_cfg())
  assert logging.observe(5, _metrics(float("nan"), float("nan"))) is None
  assert logging.pop_events()[0]["event"] == "unstable"
  skipping = monitor.StabilityMonitor(_cfg(action="skip"))
  assert skipping.observe(5, _metrics(9.0, 3.0, skipped=True)) is None
  assert skipping.summary()["skipped_steps"] == 1 and skipping.pop_events()[0]["event"] == "skip"
  rolling = monitor.StabilityMonitor(_cfg(action="rollback"))
  assert rolling.observe(5, _metrics(9.0, 2.5)) == "rollback"
  assert rolling.observe(6, _metrics(3.0, 1.1)) is None


def test_state_round_trip_through_json():
  m = monitor.StabilityMonitor(_cfg())
  for step in range(15):
    m.observe(step, _metrics(3.0, 1.0 + 0.02 * step, l1=2.0 + step, nu_max=0.1))
  restored = monitor.StabilityMonitor(_cfg(), json.loads(json.dumps(m.state())))
  assert restored.summary() == m.summary()
  m.observe(15, _metrics(3.0, 1.5, 4.0, 0.1))
  restored.observe(15, _metrics(3.0, 1.5, 4.0, 0.1))
  assert restored.summary() == m.summary()
