"""Runs of `slw_jax.main` stopped for real (SIGKILL at a random step, SIGKILL in the middle of
an asynchronous save and inside a rollback, SIGTERM whose save misses its deadline), resumed
until done: every loss equals an uninterrupted run's, bit for bit (CPU)."""

import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import metric_rows
from runs import STEPS, command as _command, finish as _finish, run as _run, start as _start
from slw_jax import checkpoint, resume

def _wait_for(process, ready, timeout=240):
  deadline = time.time() + timeout
  while not ready():
    assert process.poll() is None, _finish(process)
    assert time.time() < deadline, "the run never reached the moment to stop it"
    time.sleep(0.001)


def _steps_done(workdir) -> int:
  return len(metric_rows(workdir)) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else 0


def _saves_in_progress(workdir) -> set[str]:
  directory = os.path.join(workdir, "checkpoints")
  return {n for n in os.listdir(directory) if n.endswith(checkpoint.TMP_SUFFIX)} if os.path.isdir(
      directory) else set()


def _final_rows(workdir) -> list[dict]:
  """Each step's last row (a rollback's abandoned steps have an earlier one)."""
  return list({r["step"]: r for r in metric_rows(workdir)}.values())


@pytest.fixture(scope="module")
def reference(session_config, tmp_path_factory) -> str:
  """The workdir of the run never stopped."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  _run(_command(session_config, workdir))
  return workdir


def _same_run(reference, workdir, steps=STEPS):
  rows, expected = _final_rows(workdir), _final_rows(reference)
  assert [r["step"] for r in rows] == list(range(steps))
  assert [r["loss"] for r in rows] == [r["loss"] for r in expected]  # Bitwise equal floats.
  assert [r["adam_nu_max"] for r in rows] == [r["adam_nu_max"] for r in expected]
  evals = [(r["step"], r["val_loss"]) for r in metric_rows(workdir, "val_loss")]
  assert evals == [(r["step"], r["val_loss"]) for r in metric_rows(reference, "val_loss")]
  events, expected = (_rollbacks(d) for d in (workdir, reference))
  assert events == expected and len(expected) == 2
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (workdir, reference)]
  assert summaries[0]["stability"] == summaries[1]["stability"]


def _rollbacks(workdir) -> list[dict]:
  with open(os.path.join(workdir, "events.jsonl")) as f:
    return [e for e in map(json.loads, f) if e["event"] == "rollback"]


def _kill_mid_save(command, workdir, tries=3) -> bool:
  """SIGKILLs the run while an asynchronous save is on disk half-written; True once a kill
  left a save's temporary directory behind (the kill came mid-save)."""
  for _ in range(tries):
    left = _saves_in_progress(workdir)  # By an earlier try (removed as this run starts).
    process = _start(command)
    before = _steps_done(workdir)
    _wait_for(process, lambda: _steps_done(workdir) > before + 4 and (
        _saves_in_progress(workdir) - left))
    process.kill()
    _finish(process)
    assert process.returncode == -signal.SIGKILL
    if _saves_in_progress(workdir) - left:
      return True
  return False


def test_killed_terminated_and_killed_mid_save_a_run_ends_as_if_never_stopped(
    make_config, reference, tmp_path):
  workdir = str(tmp_path / "run")
  command = _command(make_config, workdir)
  assert _kill_mid_save(command, workdir)

  # SIGTERM whose save cannot meet checkpoint.preemption_timeout_s: exit 0 at once, the save
  # abandoned, the previous checkpoint still the newest.
  process = _start(_command(make_config, workdir, checkpoint__preemption_timeout_s=0.001))
  before = _steps_done(workdir)
  _wait_for(process, lambda: _steps_done(workdir) > before + 10)
  signalled = time.monotonic()
  process.send_signal(signal.SIGTERM)
  output = _finish(process)
  assert process.returncode == 0, output
  assert time.monotonic() - signalled < 20, output
  stopped = json.load(open(os.path.join(workdir, "summary.json")))["steps"]
  assert f"abandoned the save of step {stopped}" in output
  assert f"exiting without waiting for the save of step {stopped}" in output
  assert max(checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), 3).complete_steps()) < stopped

  _kill_at_a_random_step_then_finish(command, workdir)
  _same_run(reference, workdir)


def _kill_at_a_random_step_then_finish(command, workdir):
  target = _steps_done(workdir) + int(np.random.default_rng().integers(5, 30))
  process = _start(command)
  _wait_for(process, lambda: _steps_done(workdir) >= target)
  process.kill()
  _finish(process)
  assert process.returncode == -signal.SIGKILL, f"killed at step {target}"
  _run(command)


def test_killed_inside_rollbacks_a_run_ends_as_if_never_stopped(make_config, reference,
                                                                 tmp_path):
  """The rollback at step 25 is killed once its journal is written; the resumed run, once the
  first checkpoint after it is on disk, before it removes the journal (the next start finds
  the journal spent: it resumes from that checkpoint, deleting nothing)."""
  workdir = str(tmp_path / "run")
  command = _command(make_config, workdir)
  journal = os.path.join(workdir, resume.JOURNAL)
  for kill in ("after_journal", "before_clear"):
    process = _start(command, {"SLW_FAULT_KILL": kill})
    _finish(process)
    assert process.returncode == -signal.SIGKILL, kill
    assert os.path.exists(journal), kill
  saved = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), 3).complete_steps()
  assert max(saved) > json.load(open(journal))["target"]
  _run(command)
  _same_run(reference, workdir)
  assert json.load(open(os.path.join(workdir, "summary.json")))["stability"]["rollbacks"] == 2


# Adaptive pacing: a decision every 4 steps (the deadline, 25% of the 120 steps, is full
# length from step 30); the rollbacks at steps 25 and 60 restore their targets' pacing state.
ADAPTIVE_RUN = {"pacing__kind": "adaptive", "pacing__adaptive__every_steps": 4}


@pytest.fixture(scope="module")
def adaptive_reference(session_config, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("adaptive_reference"))
  _run(_command(session_config, workdir, **ADAPTIVE_RUN))
  return workdir


def _decisions(workdir) -> dict[int, dict]:
  """Each decision step's last pacing event (a resume or a rollback repeats some)."""
  with open(os.path.join(workdir, "events.jsonl")) as f:
    return {e["step"]: e for e in map(json.loads, f) if e["event"] == "pacing"}


def test_an_adaptive_run_killed_anywhere_decides_and_trains_as_if_never_stopped(
    make_config, adaptive_reference, tmp_path):
  workdir = str(tmp_path / "run")
  command = _command(make_config, workdir, **ADAPTIVE_RUN)
  process = _start(command, {"SLW_FAULT_KILL": "after_journal"})  # Inside the first rollback.
  _finish(process)
  assert process.returncode == -signal.SIGKILL
  assert "pacing" in json.load(open(os.path.join(workdir, resume.JOURNAL)))
  _kill_at_a_random_step_then_finish(command, workdir)
  _same_run(adaptive_reference, workdir)
  decisions = _decisions(adaptive_reference)
  assert _decisions(workdir) == decisions
  assert {e["decision"] for e in decisions.values()} >= {"grow"}
  rows = _final_rows(workdir)
  assert [r["seqlen"] for r in rows] == [r["seqlen"] for r in _final_rows(adaptive_reference)]
  summaries = [json.load(open(os.path.join(d, "summary.json"))) for d in (workdir,
                                                                          adaptive_reference)]
  assert summaries[0]["pacing"] == summaries[1]["pacing"]
  assert summaries[0]["pacing"]["kind"] == "adaptive"
