"""Adaptive (closed-loop) pacing: the controller's rule, its schedules, its config errors, and
the trainer running it (decisions as events, state in checkpoints, resume and rollback)."""

import json
import math

import numpy as np
import pytest

from conftest import metric_rows as _rows, poison_position
from stops import StopAt
from slw_jax import adaptive, errors, optim, pacing, trainer, tune

ADAPTIVE = {"pacing.kind": "adaptive", "pacing.adaptive.every_steps": 2,
            "pacing.adaptive.deadline_fraction": 0.75, "train_steps": 16}


def _config(make_config, **overrides):
  return make_config(**{k.replace(".", "__"): v for k, v in {**ADAPTIVE, **overrides}.items()})


def _quiet(seqlen, loss=3.0, grad_norm=1.0, nu_max=0.01, ratio=1.0):
  return {"seqlen": seqlen, "loss": loss, "loss_ratio": ratio, "grad_norm": grad_norm,
          "adam_nu_max": nu_max}


def _feed(controller, rows, first_step=0):
  """Observes `rows` from `first_step`; returns the decisions' events."""
  events = [controller.observe(first_step + i, row) for i, row in enumerate(rows)]
  return [e for e in events if e is not None]


# ----- the rule ----------------------------------------------------------------------------

def test_ladder_climbs_by_the_multiple_or_by_whole_buckets(make_config):
  assert pacing.ladder(_config(make_config)) == [8, 16, 24, 32]
  padded = _config(make_config, **{"compile.pad_multiple": 16, "pacing.seqlen_start": 12})
  assert pacing.ladder(padded) == [8, 16, 32]  # Start rounded down, then whole buckets.


def test_quiet_windows_grow_one_rung_from_two_steps_on(make_config):
  controller = adaptive.Controller(_config(make_config))
  events = _feed(controller, [_quiet(8)] * 2)
  assert [(e["decision"], e["seqlen"], e["new_seqlen"], e["from_step"]) for e in events] == [
      ("grow", 8, 16, 3)]
  assert controller.changes == [[0, 8], [3, 16]]
  assert controller.observe(2, _quiet(8)) is None  # Mid-window: nothing to decide.


@pytest.mark.parametrize("excursion", [
    {"ratio": 1.3}, {"grad_norm": 2.5}, {"nu_max": 0.025}])
def test_an_excursion_holds(make_config, excursion):
  controller = adaptive.Controller(_config(make_config, **{"pacing.adaptive.every_steps": 12,
                                                          "train_steps": 40}))
  events = _feed(controller, [_quiet(8)] * 11 + [_quiet(8, **excursion)])
  assert [e["decision"] for e in events] == ["hold"] and controller.changes == [[0, 8]]


def test_medians_judge_only_with_history_and_skip_non_finite_values(make_config):
  controller = adaptive.Controller(_config(make_config))
  # A gradient norm 10x the one before, but the median has 1 value: no excursion yet.
  assert _feed(controller, [_quiet(8), _quiet(8, grad_norm=10.0)])[0]["decision"] == "grow"
  assert list(controller.recent["grad_norm"]) == [1.0, 10.0]
  controller.observe(2, _quiet(16, grad_norm=math.nan))
  assert list(controller.recent["grad_norm"]) == [1.0, 10.0]


@pytest.mark.parametrize("backoff,decision,changes", [
    (False, "hold", [[0, 8], [3, 16], [5, 24]]),
    (True, "backoff", [[0, 8], [3, 16], [5, 24], [7, 16]])])
def test_a_spike_backs_off_one_rung_only_with_backoff(make_config, backoff, decision, changes):
  controller = adaptive.Controller(_config(make_config, **{"pacing.adaptive.backoff": backoff}))
  _feed(controller, [_quiet(8), _quiet(8), _quiet(8), _quiet(16)])
  events = _feed(controller, [_quiet(24), _quiet(24, loss=math.inf, ratio=math.inf)], 4)
  assert events[0]["decision"] == decision and controller.changes == changes
  assert events[0]["spikes"] == 1


def test_full_length_ends_the_decisions(make_config):
  controller = adaptive.Controller(_config(make_config))
  assert _feed(controller, [_quiet(32)] * 4) == [] and controller.decisions["grow"] == 0


def test_state_round_trips_and_decides_the_same(make_config):
  c = _config(make_config)
  rows = [_quiet(8, grad_norm=1 + (i % 3), loss=3 - i / 10) for i in range(9)]
  whole = adaptive.Controller(c)
  expected = _feed(whole, rows)
  first = adaptive.Controller(c)
  _feed(first, rows[:5])
  saved = json.loads(json.dumps(first.state()))  # Through a checkpoint's JSON record.
  second = adaptive.Controller(c, saved)
  assert [e for e in expected if e["step"] < 5] + _feed(second, rows[5:], 5) == expected
  assert second.state() == whole.state()


# ----- schedules ---------------------------------------------------------------------------

def test_slowest_schedule_is_the_deadline_ramp_by_tokens(make_config):
  c = _config(make_config, **{"train_steps": None, "train_tokens": 4000,
                              "pacing.adaptive.deadline_fraction": 0.5})
  s = pacing.run_schedule(c)
  assert s.total_tokens >= 4000 > s.tokens_before[-2]
  deadline = pacing.Deadline(c)
  for t in range(s.num_steps):
    assert s.seqlen[t] == deadline.floor(t, s.tokens_before[t])
  assert s.seqlen[-1] == 32 and np.all(np.diff(s.seqlen) >= 0)
  # Full length once half the tokens are in, never before the ramp says so.
  assert s.seqlen[np.searchsorted(s.tokens_before, 2000)] == 32


def test_fastest_schedule_grows_at_every_decision_and_ends_sooner(make_config):
  c = _config(make_config, **{"train_steps": None, "train_tokens": 4000})
  fastest = pacing.run_schedule(c, pacing.fastest_changes(c))
  assert list(fastest.seqlen[:9]) == [8, 8, 8, 16, 16, 24, 24, 32, 32]
  assert fastest.num_steps < pacing.run_schedule(c).num_steps
  assert fastest.total_tokens >= 4000 > fastest.tokens_before[-2]


def test_lr_decays_by_the_tokens_of_the_schedule_walked(make_config):
  c = _config(make_config, **{"train_steps": None, "train_tokens": 4000})
  fastest = pacing.run_schedule(c, pacing.fastest_changes(c))
  lrs = optim.learning_rates(c, fastest)
  assert lrs[-1] == pytest.approx(c.optim.min_lr, rel=0.05)  # The decay ends on the budget.
  assert lrs[0] == pytest.approx(c.optim.lr / c.optim.warmup_steps)


@pytest.mark.parametrize("overrides", [
    {"train_steps": None, "train_tokens": 40_000, "pacing.adaptive.deadline_fraction": 0.3},
    {"train_steps": 300, "train_tokens": 10**6},  # The steps end it: the ramp is by steps.
    {"train_steps": None, "train_tokens": 40_000, "batch_warmup.start": 1,
     "batch_warmup.tokens": 9_000, "batch_warmup.allow_with_slw": True, "mesh.data": 1,
     "mesh.tensor": 1}])
def test_the_walk_is_the_step_by_step_rule(make_config, overrides):
  """Walked in runs of steps, it is exactly max(the change in effect, the floor) at every step,
  with the batch size of the tokens before it."""
  c = _config(make_config, **overrides)
  for changes in ([[0, 8]], [[0, 8], [5, 16], [40, 24], [41, 16], [90, 32]]):
    s = pacing.run_schedule(c, changes)
    deadline = pacing.Deadline(c)
    for t in range(s.num_steps):
      in_effect = [seqlen for first, seqlen in changes if first <= t][-1]
      assert s.seqlen[t] == max(in_effect, deadline.floor(t, s.tokens_before[t])), t
      assert s.batch_size[t] == pacing.batch_size_at(c, s.tokens_before[t]), t
    assert s.seqlen[-1] == 32
    assert s.num_steps == overrides["train_steps"] or (
        s.tokens_before[-1] >= c.train_tokens > s.tokens_before[-2])


def test_lengths_are_not_a_function_of_the_step_alone(make_config):
  with pytest.raises(ValueError, match="decides lengths online"):
    pacing.seqlen_at(_config(make_config).pacing, 3)


# ----- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"pacing.adaptive.every_steps": 0}, r"pacing.adaptive.every_steps=0 is invalid: must be an "
                                         r"integer >= 1"),
    ({"pacing.adaptive.median_window": -3}, r"pacing.adaptive.median_window=-3"),
    ({"pacing.adaptive.deadline_fraction": 1.0}, r"deadline_fraction=1.0 is invalid: must be a "
                                                 r"number in \(0, 1\)"),
    ({"pacing.adaptive.deadline_fraction": 0.99, "train_steps": 50},
     r"deadline_fraction=0.99 is invalid: the deadline's ramp does not reach seqlen_end=32 "
     r"within the run's 50 steps \(its last steps are 24 long\)"),
    ({"pacing.adaptive.deadline_fraction": 0.1}, r"deadline_fraction=0.1 is invalid: it reaches "
                                                 r"seqlen_end=32 at step \d, before the first"),
    ({"pacing.adaptive.max_loss_ratio": 0.9},
     r"max_loss_ratio=0.9 is invalid: must be a number > 1"),
    ({"batch_warmup.start": 2, "batch_warmup.tokens": 100},
     r"batch_warmup.start=2 is invalid: batch warmup together with pacing.kind='adaptive' needs "
     r"batch_warmup.allow_with_slw=True"),
])
def test_bad_adaptive_settings_are_one_line_errors(make_config, overrides, message):
  with pytest.raises(errors.ConfigError, match=message):
    _config(make_config, **overrides)


def test_unknown_adaptive_keys_are_refused(make_config):
  with pytest.raises((AttributeError, KeyError, errors.ConfigError), match="every_step\\b"):
    _config(make_config, **{"pacing.adaptive.every_step": 3})


def test_tune_refuses_an_adaptive_run(make_config, tmp_path):
  with pytest.raises(tune.TuneError, match="adaptive pacing decides its lengths online"):
    tune.Tuner(_config(make_config), str(tmp_path))


# ----- the trainer -------------------------------------------------------------------------

def _events(workdir, kind="pacing"):
  with open(workdir / "events.jsonl") as f:
    return [e for e in map(json.loads, f) if e["event"] == kind]


@pytest.mark.slow
def test_a_run_lengthens_by_its_decisions_and_records_them(make_config, tmp_path):
  c = _config(make_config)
  run = trainer.Trainer(c, str(tmp_path))
  summary = run.run()
  assert summary["completed"] and summary["steps"] == 16
  rows, events = _rows(tmp_path), _events(tmp_path)
  assert events and all(e["step"] % 2 == 1 for e in events)
  replayed = adaptive.Controller(c)  # The decisions are a function of the rows alone.
  assert [e for e in (replayed.observe(r["step"], r) for r in rows) if e] == events
  assert replayed.changes == summary["pacing"]["changes"]
  expected = pacing.run_schedule(c, summary["pacing"]["changes"])
  assert [r["seqlen"] for r in rows] == list(expected.seqlen)
  assert [r["tokens"] for r in rows] == list(expected.tokens_before[:-1])
  assert max(r["seqlen"] for r in rows) == 32  # The deadline: full length by the end.
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["pacing"]["kind"] == "adaptive"


@pytest.mark.slow
def test_a_rollback_restores_the_pacing_state_of_its_target(make_config, tmp_path, monkeypatch):
  poison_position(monkeypatch, 7 * 4)  # Step 7's batch: back to checkpoint 4.
  c = _config(make_config, **{"monitor.action": "rollback", "checkpoint.every_steps": 4})
  run = trainer.Trainer(c, str(tmp_path))
  summary = run.run()
  assert summary["completed"] and summary["stability"]["rollbacks"] == 1
  final = list({r["step"]: r for r in _rows(tmp_path)}.values())  # Each step's last row.
  replayed = adaptive.Controller(c)  # The decisions of the steps that count, and only those.
  for row in final:
    replayed.observe(row["step"], row)
  assert summary["pacing"] == replayed.summary()  # Decision counts included.
  assert run.pacer.state() == replayed.state()  # And its medians: no abandoned step in them.
  assert [r["seqlen"] for r in final] == list(
      pacing.run_schedule(c, replayed.changes).seqlen)


@pytest.mark.slow
def test_switching_between_fixed_and_adaptive_pacing_is_a_recipe_change(make_config, tmp_path):
  same_keys = {"pacing__adaptive__every_steps": 2, "pacing__adaptive__deadline_fraction": 0.75}
  trainer.Trainer(make_config(train_steps=8, **same_keys), str(tmp_path)).run()  # Linear.
  c = _config(make_config)
  with pytest.raises(errors.StopTraining, match=r"another recipe.*pacing.kind='linear' there, "
                     r"'adaptive' here"):
    trainer.Trainer(c, str(tmp_path)).setup()
  summary = trainer.Trainer(c, str(tmp_path), allow_schedule_change=True).run()
  assert summary["completed"] and summary["pacing"]["changes"] == [[0, 8], [8, 32]]
  assert [r["seqlen"] for r in _rows(tmp_path)][8:] == [32] * 8  # Not back to the start.
  assert any(e["event"] == "schedule_change" for e in map(json.loads, open(
      tmp_path / "events.jsonl")))
  back = make_config(train_steps=16, **same_keys)  # And adaptive's checkpoint as linear.
  with pytest.raises(errors.StopTraining, match=r"pacing.kind='adaptive' there, 'linear' here"):
    trainer.Trainer(back, str(tmp_path)).setup()


@pytest.mark.slow
def test_the_report_plots_length_and_signals_of_an_adaptive_run(make_config, tmp_path):
  from slw_jax import report  # pylint: disable=g-import-not-at-top
  trainer.Trainer(_config(make_config), str(tmp_path / "run")).run()
  report.build([str(tmp_path / "run")], str(tmp_path / "report"))
  assert (tmp_path / "report" / "adaptive_pacing.png").stat().st_size > 10_000
  assert "adaptive_pacing.png" in (tmp_path / "report" / "report.md").read_text()


def test_plan_prints_the_fastest_and_slowest_schedules(make_config):
  from slw_jax import plan  # pylint: disable=g-import-not-at-top
  c = _config(make_config)
  bounds = plan.build_plan(c)["adaptive"]
  assert bounds["fastest"]["total_steps"] == 16 == bounds["slowest"]["total_steps"]
  assert bounds["fastest"]["full_length_step"] == 7  # Decisions at steps 1, 3, 5: from 3, 5, 7.
  assert bounds["slowest"]["full_length_step"] == 12  # The ramp: 8 + 24 * t / (0.75 * 16).
  assert bounds["slowest"]["buckets"] == [8, 16, 24, 32]
  text, _ = plan.render(plan.build_plan(c), "text")
  assert "fastest: 16 steps, full length from step 7" in text
  assert "decided online" in text


@pytest.mark.slow
def test_a_resumed_run_decides_and_trains_bitwise_as_one_never_stopped(make_config, tmp_path):
  c = _config(make_config, **{"checkpoint.every_steps": 100})  # Only the stop's save.
  reference = trainer.Trainer(c, str(tmp_path / "a")).run()
  stopped = StopAt(c, str(tmp_path / "b"), stop_after=6).run()  # A window ends at step 5.
  assert not stopped["completed"] and 7 <= stopped["steps"] <= 8
  resumed = trainer.Trainer(c, str(tmp_path / "b")).run()
  assert resumed["completed"] and resumed["pacing"] == reference["pacing"]
  a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # Bitwise equal floats.
  assert [r["seqlen"] for r in a] == [r["seqlen"] for r in b]
  assert _events(tmp_path / "a") == _events(tmp_path / "b")
