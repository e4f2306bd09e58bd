"""Stability monitor: loss-ratio counts, Pearson statistics, nu spikes, state round trip."""

import json

import numpy as np
import pytest
from ml_collections import config_dict
from scipy import stats

from slw_jax import monitor


def _cfg(**overrides):
  values = dict(ratio_threshold=1.2, action="log", skip_ratio=2.0, max_rollbacks=3,
                spike_window=20, spike_factor=2.0, max_bad_in_a_row=20)
  values.update(overrides)
  return config_dict.FrozenConfigDict(values)


def _metrics(loss, ratio, l1=1.0, nu_max=0.1, skipped=False, grad_norm=1.0):
  return {"loss": loss, "loss_ratio": ratio, "adam_nu_l1": l1, "adam_nu_max": nu_max,
          "skipped": skipped, "grad_norm": grad_norm}


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


def test_a_saved_state_is_a_snapshot_that_later_steps_leave_alone():
  """A checkpoint's JSON is serialized after the run went on (asynchronous saves)."""
  m = monitor.StabilityMonitor(_cfg())
  for step in range(5):
    m.observe(step, _metrics(3.0, 1.0 + 0.02 * step))
  saved = m.state()
  before = json.dumps(saved, sort_keys=True)
  m.observe(5, _metrics(3.0, 1.3))
  assert json.dumps(saved, sort_keys=True) == before


@pytest.mark.parametrize("grad_norm", [float("nan"), float("inf")])
def test_a_finite_loss_with_non_finite_gradients_is_a_bad_step(grad_norm):
  for action in ("log", "skip", "rollback"):
    m = monitor.StabilityMonitor(_cfg(action=action))
    got = m.observe(3, _metrics(3.0, 1.0, grad_norm=grad_norm, skipped=action == "skip"))
    assert got == ("rollback" if action == "rollback" else None)
    assert m.summary()["bad_steps"] == 1


@pytest.mark.parametrize("action", ["log", "skip", "rollback"])
def test_too_many_bad_steps_in_a_row_stop_the_run(action):
  m = monitor.StabilityMonitor(_cfg(action=action, max_bad_in_a_row=3))
  bad = lambda: _metrics(float("nan"), float("nan"), skipped=action == "skip")  # noqa: E731
  assert m.observe(0, bad()) in (None, "rollback")
  assert m.observe(1, _metrics(3.0, 1.0)) is None  # A good step resets the count.
  assert [m.observe(t, bad()) for t in (2, 3)] == [None if action != "rollback" else "rollback"] * 2
  assert m.observe(4, bad()) == "stop"
  assert m.summary()["bad_in_a_row"] == 3 and m.pop_events()[-1] == {
      "step": 4, "event": "stop", "bad_in_a_row": 3}


def test_a_checkpoint_from_before_the_bad_step_count_loads():
  m = monitor.StabilityMonitor(_cfg())
  m.observe(0, _metrics(3.0, 0.0))
  old = {k: v for k, v in m.state().items() if k != "bad_in_a_row"}
  assert monitor.StabilityMonitor(_cfg(), old).bad_in_a_row == 0


def test_spike_score_is_olmo_cores_share_of_six_sigma_steps():
  """OLMo-core's SpikeScore (total): steps whose loss or grad norm is above the mean of the
  previous 128 values by more than 6 std, over all steps."""
  rng = np.random.default_rng(0)
  losses = list(3.0 + 0.01 * rng.standard_normal(400))
  norms = list(1.0 + 0.01 * rng.standard_normal(400))
  losses[200] = 3.5  # 50 sigma above the mean of the 128 before it.
  norms[250] = 2.0  # A gradient-norm spike alone counts too.
  norms[260], losses[260] = 2.0, 3.5  # Both in one step: one spiking step.
  losses[300] = float("nan")  # No spike, and kept out of later windows.
  m = monitor.StabilityMonitor(_cfg(max_bad_in_a_row=1000))
  for step in range(127):
    m.observe(step, _metrics(losses[step], 1.0, grad_norm=norms[step]))
  assert m.summary()["spike_score"] is None  # Not before 128 steps.
  for step in range(127, 400):
    m.observe(step, _metrics(losses[step], 1.0, grad_norm=norms[step]))
  s = m.summary()
  assert s["spike_steps"] == 3 and s["spike_score"] == pytest.approx(3 / 400)
  restored = monitor.StabilityMonitor(_cfg(), json.loads(json.dumps(m.state())))
  assert restored.summary()["spike_score"] == s["spike_score"]
  assert {k: list(v) for k, v in restored.recent.items()} == {
      k: list(v) for k, v in m.recent.items()}


def test_a_constant_series_has_no_spikes():
  m = monitor.StabilityMonitor(_cfg())
  for step in range(200):
    m.observe(step, _metrics(3.0, 1.0, grad_norm=1.0))
  assert m.summary()["spike_score"] == 0.0
