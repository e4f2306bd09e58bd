"""Weights & Biases logging, in offline mode, read back from the run files W&B writes."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, TEST_RUN, metric_rows, poison_position
from stops import StopAt
from wandb_records import offline_runs
from slw_jax import config_lib, errors, report, trainer, wandb_log


@pytest.fixture(autouse=True)
def no_wandb_account(monkeypatch, tmp_path):
  """No API key, no settings from this machine: nothing can reach W&B's servers."""
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))


def _offline(make_config, **overrides):
  return make_config(log__wandb_project="slw-tests", log__wandb_mode="offline",
                     monitor__action="skip", **overrides)


@pytest.mark.slow
def test_a_run_logs_config_rows_events_and_summary_and_a_resume_continues_it(
    make_config, tmp_path, monkeypatch):
  poison_position(monkeypatch, 3 * 4)  # Step 3 gets a NaN loss: a "skip" event.
  c = _offline(make_config)
  workdir = str(tmp_path / "run")
  assert not StopAt(c, workdir, stop_after=5).run()["completed"]
  stored = json.load(open(os.path.join(workdir, wandb_log.RUN_FILE)))
  assert trainer.Trainer(c, workdir).run()["completed"]
  first, resumed = offline_runs(workdir)
  assert first.id == resumed.id == stored["id"]  # One W&B run across the resume.
  assert resumed.config["batch_size"] == c.batch_size
  assert resumed.config["pacing"]["seqlen_start"] == c.pacing.seqlen_start
  logged = [h for run in (first, resumed) for h in run.history if "train/loss" in h]
  rows = metric_rows(workdir)
  # Every row of metrics.jsonl is in W&B, each step once (the stop saved the step it ended
  # at, so the resume redid none), the first run's up to the stop, the resumed run's after.
  assert [(h["step"], repr(float(h["train/loss"]))) for h in logged] == [
      (r["step"], repr(float(r["loss"]))) for r in rows]  # Step 3's NaN: "nan" in the jsonl.
  stopped_at = first.summary["steps"]
  assert [h["step"] for h in first.history if "train/loss" in h] == list(range(stopped_at))
  assert rows[-1]["step"] == 11 and stopped_at in (6, 7)
  evals = [h for run in (first, resumed) for h in run.history if "eval/val_loss" in h]
  assert [h["step"] for h in evals] == [r["step"] for r in metric_rows(workdir, "val_loss")]
  skips = [h for h in first.history if "events/skip" in h]
  assert [h["step"] for h in skips] == [3] and "events/skip/loss" in skips[0]
  assert resumed.summary["completed"] is True and resumed.summary["steps"] == 12
  assert first.summary["completed"] is False
  assert first.exit_code == resumed.exit_code == 0  # A stop is a normal end, like the finish.


def test_a_setup_that_fails_finishes_its_wandb_run_with_exit_code_1(make_config, tmp_path,
                                                                    monkeypatch):
  def broken_restore(self):
    raise RuntimeError("a bug in setup")
  monkeypatch.setattr(trainer.Trainer, "restore_or_init", broken_restore)
  run = trainer.Trainer(_offline(make_config), str(tmp_path / "run"))
  with pytest.raises(RuntimeError, match="a bug in setup"):
    run.run()
  (offline,) = offline_runs(str(tmp_path / "run"))
  assert offline.exit_code == 1 and run.wandb.run is None
  assert "batch_size" not in offline.config  # The config is logged when the loop starts.


def test_report_adds_its_plots_to_the_run(make_config, tmp_path):
  workdir = tmp_path / "run"
  run = wandb_log.start_run(str(workdir), "slw-tests", mode="offline", config={"a": 1})
  run.log({"step": 0, "train/loss": 5.0})
  run.finish()
  time.sleep(1.1)  # W&B names offline runs by the second: the report's run gets its own.
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in range(3):
      f.write(json.dumps({"step": step, "tokens": 32 * step, "seqlen": 8, "loss": 5.0 - step,
                          "loss_ratio": 1.0, "lr": 1e-3, "step_time_s": 0.1, "grad_norm": 1.0,
                          "adam_nu_l1": 1.0, "adam_nu_max": 0.1}) + "\n")
  report.build([str(workdir)], str(tmp_path / "out"), wandb=True)
  runs = offline_runs(str(workdir))
  assert len(runs) == 2 and runs[0].id == runs[1].id
  images = [h for h in runs[1].history if "report/loss_vs_tokens/_type" in h]
  assert len(images) == 1 and images[0]["report/loss_vs_tokens/_type"] == "image-file"
  assert {k.split("/")[1] for k in images[0] if k.startswith("report/")} == {
      os.path.splitext(name)[0] for name in report.PLOTS}
  assert any(path.startswith("media/images/report/loss_vs_tokens") for path in runs[1].files)


def test_only_process_0_logs_and_no_project_means_no_wandb(make_config, tmp_path):
  c = _offline(make_config)
  assert wandb_log.open_for(c, str(tmp_path / "a"), primary=False) is None
  assert wandb_log.open_for(make_config(), str(tmp_path / "b"), primary=True) is None
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_online_without_an_api_key_is_one_line_before_anything_compiles(make_config, tmp_path):
  """python -m slw_jax.main --config.log.wandb_project=slw with no W&B key: exit 2 and one
  line naming the project and the cause; no checkpoint written, no compile started."""
  c = make_config()
  overrides = {k: v for k, v in TEST_RUN.items() if v is not None}
  overrides.update({"data.source": c.data.source, "data.dir": c.data.dir,
                    "log.wandb_project": "slw"})
  done = subprocess.run(
      [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 2, done.stderr
  assert done.stderr.splitlines() == [
      "error: log.wandb_project='slw' (log.wandb_mode=online): W&B could not start the run: "
      "No API key configured. Use `wandb login` to log in. (or log.wandb_mode=offline)"]
  checkpoints = tmp_path / "run" / "checkpoints"
  assert not checkpoints.exists() or not os.listdir(checkpoints)  # No checkpoint saved,
  assert "compiled" not in done.stdout  # and nothing compiled.


def test_bad_wandb_settings_and_a_missing_package_are_config_errors(load_config, monkeypatch):
  with pytest.raises(errors.ConfigError, match="log.wandb_mode='cloud' .* online, offline"):
    config_lib.validate(load_config("tiny", log__wandb_project="p", log__wandb_mode="cloud"))
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
  with pytest.raises(errors.ConfigError, match="log.wandb_project='p' needs the wandb package, "
                     "which is not installed: pip install wandb"):
    config_lib.validate(load_config("tiny", log__wandb_project="p"))
  config_lib.validate(load_config("tiny"))  # No project: wandb is not needed.
