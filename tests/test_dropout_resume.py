"""The dropout stream across a resume and a rollback, with the paper configs' rates
(model.dropout = model.attention_dropout = 0.1): each step's masks come from (seed, step), so a
run stopped and resumed, or rolled back in the loop or by a restart from the rollback's journal,
draws the masks the uninterrupted run draws, and ends bitwise equal. A key drawn from anything a
restart resets (a count of the steps this process ran, a fresh key) would pass every resume test
without dropout and fail these."""

import jax
import numpy as np
import pytest

from conftest import metric_rows, poison_position
from stops import StopAt
from slw_jax import config_lib, resume, train_step, trainer

pytestmark = pytest.mark.slow  # Whole trainer runs / 8-device compiles.

# Two buckets (16, 32) instead of the test run's four: half the compiles.
DROPOUT = {"model__dropout": 0.1, "model__attention_dropout": 0.1, "pacing__seqlen_start": 16,
           "pacing__multiple": 16}


def _losses_by_step(workdir) -> dict[int, float]:
  """Each step's loss as last logged (a rollback logs the steps it replays again)."""
  return {r["step"]: r["loss"] for r in metric_rows(workdir)}


def _assert_same_state(a, b):
  for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_dropout_draws_per_step(c, params):
  """The runs compared really drop: the train step's loss of one batch under the masks of two
  steps, and without dropout, are three different numbers."""
  graphdef, _ = train_step.build_model(c)
  without = config_lib.with_overrides(c, {"model.dropout": 0.0, "model.attention_dropout": 0.0})
  tokens = np.random.default_rng(0).integers(0, 259, (4, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  params = jax.device_get(params)
  losses = set()
  for config, step in ((c, 2), (c, 3), (without, 2)):
    loss_and_grads = train_step.make_loss_and_grads(config, graphdef, 1)
    losses.add(float(jax.jit(lambda p, b, s, f=loss_and_grads: f(p, b, s)[0]["loss"])(
        params, batch, step)))
  assert len(losses) == 3, losses


def test_a_resumed_run_with_dropout_is_bitwise_identical(make_config, tmp_path):
  c = make_config(**DROPOUT)
  reference = trainer.Trainer(c, str(tmp_path / "a"))
  assert reference.run()["completed"]
  stopped = StopAt(c, str(tmp_path / "b")).run()
  assert not stopped["completed"] and stopped["steps"] in (6, 7)
  resumed = trainer.Trainer(c, str(tmp_path / "b"))
  assert resumed.run()["completed"]
  a, b = _losses_by_step(tmp_path / "a"), _losses_by_step(tmp_path / "b")
  assert list(b) == list(range(12)) and b == a  # Bitwise equal floats.
  _assert_same_state(reference, resumed)
  _assert_dropout_draws_per_step(c, resumed.state["params"])


class _Killed(BaseException):
  """The process dying (nothing catches it as an error)."""


def test_a_rollback_with_dropout_replays_as_a_restart_from_its_journal_does(
    make_config, tmp_path, monkeypatch):
  """Step 5's batch is bad: the run goes back to checkpoint 4 and trains on past the batch. In
  the loop, and in a process killed once the rollback's journal is written then started again,
  the replayed steps draw the same masks (those of their step): the same losses and state."""
  poison_position(monkeypatch, 5 * 4)
  c = make_config(**DROPOUT, monitor__action="rollback", checkpoint__every_steps=4)
  in_loop = trainer.Trainer(c, str(tmp_path / "a"))
  summary = in_loop.run()
  assert summary["completed"] and summary["stability"]["rollbacks"] == 1
  write_journal = resume.write_journal

  def write_then_die(*args, **kwargs):
    write_journal(*args, **kwargs)
    raise _Killed()
  monkeypatch.setattr(resume, "write_journal", write_then_die)
  with pytest.raises(_Killed):
    trainer.Trainer(c, str(tmp_path / "b")).run()
  monkeypatch.setattr(resume, "write_journal", write_journal)
  restarted = trainer.Trainer(c, str(tmp_path / "b"))
  summary = restarted.run()
  assert summary["completed"] and summary["stability"]["rollbacks"] == 1
  a, b = _losses_by_step(tmp_path / "a"), _losses_by_step(tmp_path / "b")
  assert list(b) == list(range(12)) and b == a  # Bitwise equal floats.
  _assert_same_state(in_loop, restarted)
