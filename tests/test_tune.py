"""The low-cost tuner: its fluctuation detector on crafted curves, its config checks and cost
bound, and the whole strategy end to end on a tiny budget, interrupted and resumed."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, metric_rows as conftest_rows
from slw_jax import config_lib, errors, trainer, tune


def _losses(ppl):
  return [math.log(p) for p in ppl]


FALLING = np.linspace(300, 60, 20)


@pytest.mark.parametrize("name,ppl,fluctuates,at", [
    ("flat", [100.0] * 20, False, None),
    ("falling", FALLING, False, None),
    ("noisy within tolerance", FALLING * (1 + 0.02 * np.sin(np.arange(20) * 2.1)), False, None),
    ("noisy beyond tolerance", FALLING * (1 + 0.2 * (np.arange(20) % 2)), True, 1),
    ("one spike", np.concatenate([FALLING[:9], [FALLING[8] * 1.3], FALLING[10:]]), True, 9),
    ("slow drift up", 80 * 1.005 ** np.arange(20), True, 10),
    ("slow drift down", 80 * 0.995 ** np.arange(20), False, None),
    ("nan", [100.0, 90.0, float("nan"), 80.0], True, 2),
])
def test_detector_on_crafted_curves(name, ppl, fluctuates, at):
  got = tune.fluctuation(_losses(ppl), tolerance=0.05)
  assert (got.fluctuates, got.at) == (fluctuates, at), name
  if name == "one spike":
    assert got.max_rise == pytest.approx(0.3, rel=1e-9)
  if name == "slow drift up":  # 1.005 ** 10 = 5.11% > 5%, 1.005 ** 9 = 4.59%.
    assert got.max_rise == pytest.approx(1.005 ** 19 - 1, rel=1e-9)


def test_the_tolerance_is_configurable():
  spike = _losses([100, 90, 99, 80])  # +10% over 90.
  assert tune.fluctuation(spike, 0.05).fluctuates
  assert not tune.fluctuation(spike, 0.15).fluctuates


@pytest.mark.parametrize("field,value,message", [
    ("tune.rise_tolerance", 0.0, "must be a number in (0, 10)"),
    ("tune.max_cost_fraction", 1.5, "must be a number in (0, 1]"),
    ("tune.search_trials", 0, "must be an integer >= 1"),
    ("tune.window_warmups", -1, "must be a number in (0, 100]"),
    ("tune.max_duration_warmups", 2, "must be >= tune.first_duration_warmups=4"),
    ("tune.seqlen_starts", (16, 12), "must be ascending distinct multiples of pacing.multiple=8"),
    ("tune.seqlen_starts", (4,), "must be ascending distinct multiples of pacing.multiple=8"),
    ("tune.start_window_warmups", 0.25, "must give at least 2 validation points"),
])
def test_bad_tune_values_are_one_line_config_errors(load_config, field, value, message):
  with pytest.raises(errors.ConfigError) as info:
    config_lib.validate(load_config("tiny", pacing__multiple=8, **{field.replace(".", "__"): value}))
  assert f"config.{field}=" in str(info.value) and message in str(info.value)
  assert "\n" not in str(info.value)


def _tune_config(make_config, **overrides):
  values = dict(train_steps=None, train_tokens=2_000_000, optim__warmup_steps=4,
                tune__seqlen_starts=(8, 16), tune__first_duration_warmups=2,
                tune__max_duration_warmups=8, tune__start_window_warmups=1.0,
                tune__window_warmups=2.0, tune__search_trials=1, tune__evals_per_warmup=2,
                tune__eval_batches=1)
  values.update(overrides)
  return make_config(**values)


def test_a_plan_that_could_cost_too_much_is_refused_before_any_trial(make_config, tmp_path):
  c = _tune_config(make_config, train_tokens=20_000)
  with pytest.raises(tune.TuneError, match=r"config.tune.max_cost_fraction=0.1 is exceeded: the "
                     r"trials could take [\d,]+ tokens, [\d.]+% of the run's [\d,]+"):
    tune.Tuner(c, str(tmp_path))
  assert not (tmp_path / "trials").exists()


def test_tune_needs_an_lr_warmup_and_linear_or_root_pacing(make_config, tmp_path):
  with pytest.raises(tune.TuneError, match="optim.warmup_steps=0 .* are invalid for tune"):
    tune.Tuner(_tune_config(make_config, optim__warmup_steps=0), str(tmp_path))
  with pytest.raises(tune.TuneError, match="config.pacing.kind='none' is invalid for tune"):
    tune.Tuner(_tune_config(make_config, pacing__kind="none"), str(tmp_path))


@pytest.mark.slow
def test_the_strategy_end_to_end_interrupted_and_resumed(make_config, tmp_path, monkeypatch):
  """Starts tried in order until one is steady, then the T search; a stop signal in the middle
  of the second trial resumes that trial from its own checkpoint (the first trial is not run
  again), the result names the flags, the trials and their cost, and a directory of another
  config is refused."""
  c = _tune_config(make_config)
  runs, original_restore, original_finish = [], trainer.Trainer.restore_or_init, \
      trainer.Trainer._finish_step

  def restore_or_init(self):
    original_restore(self)
    runs.append((self.workdir, self.step))  # Where each trial's trainer starts.

  def finish_step(self, t, metrics):
    if len(runs) == 2 and t == 2 and not getattr(finish_step, "fired", False):
      finish_step.fired = True
      self.stop.signal = "SIGTERM"  # As if the tuner were killed while step 2 ran.
    return original_finish(self, t, metrics)
  monkeypatch.setattr(trainer.Trainer, "restore_or_init", restore_or_init)
  monkeypatch.setattr(trainer.Trainer, "_finish_step", finish_step)
  with pytest.raises(KeyboardInterrupt):
    tune.Tuner(c, str(tmp_path)).run()
  result = tune.Tuner(c, str(tmp_path)).run()
  workdirs = [w for w, _ in runs]
  assert workdirs[1] == workdirs[2] and runs[2][1] > 0  # Trial 2 resumed mid-window.
  assert workdirs.count(workdirs[0]) == 1  # Trial 1 was not run again.
  names = [r["name"] for r in result["trials"]]
  assert workdirs[0].endswith(names[0]) and workdirs[1].endswith(names[1])
  assert len(runs) == len(names) + 1 and len(set(names)) == len(names)
  resumed = [r["step"] for r in conftest_rows(workdirs[1])]
  assert resumed == list(range(len(resumed)))  # Every step of the window once, in order.
  assert names[0] == "s8_T8_w4"  # The smallest start first, T = 2 warmups, a 1-warmup window.
  start, duration = result["seqlen_start"], result["duration_steps"]
  assert start in (8, 16) and 8 <= duration <= 32
  searched = {r["duration_steps"]: r["fluctuates"] for r in result["trials"]
              if r["seqlen_start"] == start and r["window_steps"] == 8}
  # The largest steady T (or the shortest one, when even that fluctuates), every longer one not.
  assert searched[duration] is False or duration == min(searched)
  assert all(fluctuates for T, fluctuates in searched.items() if T > duration)
  steady_starts = [r["seqlen_start"] for r in result["trials"]
                   if r["window_steps"] == 4 and not r["fluctuates"]]
  assert start == (steady_starts[0] if steady_starts else 16)
  assert result["flags"] == (f"--config.pacing.seqlen_start={start} "
                             f"--config.pacing.duration_steps={duration}")
  for r in result["trials"]:
    assert r["tokens"] > 0 and r["seconds"] >= 0 and len(r["val_curve"]) >= 2
  assert result["tokens"] == sum(r["tokens"] for r in result["trials"])
  assert result["cost_fraction"] == pytest.approx(result["tokens"] / 2_000_000, rel=0.01)
  assert result["tokens"] <= result["cost_bound_tokens"] <= 0.1 * result["run_tokens"]
  table = (tmp_path / "tune.md").read_text()
  assert table.startswith("| trial | seqlen_start | T | steps | verdict |") and "Cost:" in table
  assert json.loads((tmp_path / "tune_result.json").read_text())["flags"] == result["flags"]
  runs.clear()
  assert tune.Tuner(c, str(tmp_path)).run()["flags"] == result["flags"] and not runs
  with pytest.raises(tune.TuneError, match=r"holds a tuner run of another config "
                     r"\(optim.lr=0.003 there, 0.002 here\)"):
    tune.Tuner(_tune_config(make_config, optim__lr=2e-3), str(tmp_path))


def test_main_prints_one_line_for_bad_input(tmp_path):
  result = subprocess.run([sys.executable, "-m", "slw_jax.tune", "--config=configs/tiny.py",
                           f"--workdir={tmp_path}", "--config.tune.rise_tolerance=-1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  err = result.stderr.strip()
  assert err.startswith("error: config.tune.rise_tolerance=-1") and "\n" not in err
