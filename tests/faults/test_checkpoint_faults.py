"""Faults met at a resume, caused for real on a finished run's directory: unreadable
checkpoints, a config or token files changed under the run, and a rollback's order of work."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import metric_rows, poison_position
from slw_jax import errors, input_pipeline, resume, trainer


@pytest.fixture(scope="module")
def finished(session_config, tmp_path_factory):
  """A 12-step test run with checkpoints 4, 8 and 12 (checkpoint.keep=3): (config, workdir)."""
  c = session_config()
  workdir = str(tmp_path_factory.mktemp("finished"))
  assert trainer.Trainer(c, workdir).run()["completed"]
  return c, workdir


def _copy(workdir, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def _truncate_largest_files(step_dir):
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
  for path in sorted(files, key=os.path.getsize)[-2:]:  # The array data and its metadata.
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {
    "truncated files": _truncate_largest_files,
    "missing item": lambda step_dir: shutil.rmtree(os.path.join(step_dir, "state")),
    "garbage metadata": lambda step_dir: open(os.path.join(step_dir, "meta", "metadata"),
                                              "w").write("garbage{"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_an_unreadable_newest_checkpoint_is_set_aside_and_the_run_goes_on(
    finished, tmp_path, capsys, corruption):
  c, base = finished
  workdir = _copy(base, tmp_path)
  CORRUPTIONS[corruption](os.path.join(workdir, "checkpoints", "12"))
  run = trainer.Trainer(c, workdir)
  summary = run.run()
  output = capsys.readouterr().out
  moved = os.path.join(workdir, "unreadable_checkpoints", "step_12")
  assert f"warning: checkpoint 12 in {workdir}/checkpoints is unreadable" in output
  assert f"moved to {moved}, resuming from step 8" in output
  assert os.path.isdir(moved)  # Kept for inspection, never deleted.
  assert summary["completed"] and run.checkpoints.complete_steps() == [4, 8, 12]
  # Steps 8-11 trained again, exactly as the first time.
  assert [r["loss"] for r in metric_rows(workdir)] == [r["loss"] for r in metric_rows(base)]


def test_every_checkpoint_unreadable_stops_with_one_line_and_moves_nothing(finished, tmp_path):
  c, base = finished
  workdir = _copy(base, tmp_path)
  for step in (4, 8, 12):
    CORRUPTIONS["garbage metadata"](os.path.join(workdir, "checkpoints", str(step)))
  with pytest.raises(errors.StopTraining, match=r"^every checkpoint in .*/checkpoints is "
                     r"unreadable: restore them .* \(step 12: .*; step 8: .*; step 4: .*\)$"):
    trainer.Trainer(c, workdir).setup()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]


RECIPE = r"another recipe.*--allow_schedule_change.*\("  # Then the fields, each named.
REFUSED = [  # (override, the field named with its saved and its new value)
    ({"model__d_model": 64}, r"another model \(model.d_model=32 there, 64 here\)"),
    ({"model__n_head": 4}, r"another model \(model.n_head=2 there, 4 here\)"),
    ({"batch_size": 8}, RECIPE + r"batch_size=4 there, 8 here"),
    ({"train_steps": 20}, RECIPE + r".*train_steps=12 there, 20 here"),
    ({"pacing__seqlen_start": 16}, RECIPE + r"pacing.seqlen_start=8 there, 16 here"),
    ({"pacing__kind": "none"}, RECIPE + r"pacing.kind='linear' there, 'none' here"),
    ({"optim__lr": 1e-3}, RECIPE + r"optim.lr=0.003 there, 0.001 here"),
    ({"seed": 1}, RECIPE + r"seed=0 there, 1 here"),
    ({"data__mode": "reshape"}, RECIPE + r"data.mode='truncate' there, 'reshape' here"),
]


@pytest.mark.parametrize("overrides,message", REFUSED,
                         ids=[next(iter(o)) for o, _ in REFUSED])
def test_an_incompatible_resume_stops_naming_the_field_before_any_compile(
    finished, session_config, overrides, message):
  c, workdir = finished
  run = trainer.Trainer(session_config(**overrides), workdir)
  with pytest.raises(errors.StopTraining, match=message):
    run.setup()
  assert run.executables.num_compiled == 0


def test_compatible_changes_are_logged_and_a_knowing_schedule_change_is_an_event(
    finished, session_config, tmp_path, capsys):
  _, base = finished
  workdir = _copy(base, tmp_path)
  changed = session_config(eval__every_steps=3, log__every_steps=2, checkpoint__keep=4,
                           compile__ahead=1, train_steps=14)
  trainer.Trainer(changed, workdir, allow_schedule_change=True).run()
  output = capsys.readouterr().out
  assert ("resuming with changed settings: checkpoint.keep=3 there, 4 here; compile.ahead=2 "
          "there, 1 here; eval.every_steps=6 there, 3 here; log.every_steps=1 there, 2 here"
          in output)
  assert "train_steps=12 there, 14 here" in output
  with open(os.path.join(workdir, "events.jsonl")) as f:
    events = [json.loads(line) for line in f]
  assert [(e["event"], e["step"]) for e in events] == [("schedule_change", 12)]
  assert "train_steps=12 there, 14 here" in events[0]["changes"]
  assert [r["step"] for r in metric_rows(workdir)][-2:] == [12, 13]


def _reprepare_train(data_dir, change):
  """Rewrites the train token file as `change(tokens)` with metadata to match, as preparing
  other data into the same directory would."""
  meta_path = os.path.join(data_dir, input_pipeline.METADATA)
  with open(meta_path) as f:
    meta = json.load(f)
  info = meta["splits"]["train"]
  path = os.path.join(data_dir, info["file"])
  tokens = change(np.fromfile(path, dtype=meta["dtype"]))
  tokens.tofile(path)
  info.update(tokens=int(len(tokens)), sha256=input_pipeline.file_sha256(path))
  with open(meta_path, "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("change,message", [
    (lambda t: t[: len(t) // 2], r"'train' token files .* changed since checkpoint 12 was saved "
     r"\(794,431 tokens there, 397,215 here\)"),
    (lambda t: np.roll(t, 1), r"'train' token files .* changed since checkpoint 12 was saved "
     r"\(its tokens differ \(sha256\)\)"),
], ids=["fewer tokens", "same size, other tokens"])
def test_token_files_changed_under_the_run_are_refused_at_start(
    finished, session_config, tmp_path, change, message):
  c, workdir = finished
  data_dir = str(tmp_path / "data")
  shutil.copytree(c.data.dir, data_dir)  # data.dir may move: the tokens are compared.
  moved = trainer.Trainer(session_config(data__dir=data_dir), workdir)
  moved._check_newest_resumable()  # pylint: disable=protected-access  # Same tokens: accepted.
  _reprepare_train(data_dir, change)
  run = trainer.Trainer(session_config(data__dir=data_dir), workdir)
  with pytest.raises(errors.StopTraining, match=message):
    run.setup()
  assert run.executables.num_compiled == 0


def test_a_rollback_recovers_never_deletes_its_target_and_frees_the_old_state_first(
    session_config, tmp_path, monkeypatch):
  """The order of a rollback's work, watched from inside: the journal first, the target kept,
  the old state freed before the restore; the monitor's counters come back with the state
  (replayed steps are not counted twice). Steps 6 and 7 are poisoned: two rollbacks to the
  same checkpoint, alike but for their number, both logged."""
  poison_position(monkeypatch, 6 * 4, 7 * 4)
  workdir = str(tmp_path)
  seen = {}
  free_state, restore = trainer.Trainer._free_state, resume.Restorer.restore

  def watched_free_state(self):
    seen.setdefault("journal", resume.read_journal(workdir))
    seen.setdefault("saved", self.checkpoints.complete_steps())
    seen["old_leaves"] = jax.tree.leaves(self.state)
    free_state(self)

  def watched_restore(self, step):
    if "old_leaves" in seen:
      seen["freed_before_restore"] = all(x.is_deleted() for x in seen["old_leaves"])
    return restore(self, step)
  monkeypatch.setattr(trainer.Trainer, "_free_state", watched_free_state)
  monkeypatch.setattr(resume.Restorer, "restore", watched_restore)
  c = session_config(monitor__action="rollback", checkpoint__every_steps=2,
                     checkpoint__keep=10)
  summary = trainer.Trainer(c, workdir).run()
  assert seen["journal"]["target"] == 6 and seen["journal"]["loader"]["position"] == 7 * 4
  assert seen["saved"] == [0, 2, 4, 6]  # The target stays; nothing after it is ever saved.
  assert seen["freed_before_restore"]
  stability = summary["stability"]
  assert summary["completed"] and stability["rollbacks"] == 2
  assert stability["steps"] == 12  # Not 14: steps 6 and 6 again were replayed.
  assert not os.path.exists(os.path.join(workdir, resume.JOURNAL))  # Gone after step 8.
  with open(os.path.join(workdir, "events.jsonl")) as f:
    rollbacks = [e for e in map(json.loads, f) if e["event"] == "rollback"]
  # Checkpoint 6 holds the state before the bad update: restore it, skip step 6's batch; the
  # next batch (step 7's) is bad too: again.
  assert [(e["step"], e["to_step"], e["skipped_batches"], e["rollback"]) for e in rollbacks] == [
      (6, 6, 1, 1), (6, 6, 1, 2)]
  rows = metric_rows(workdir)
  assert sum(r["loss"] == "nan" for r in rows) == 2  # Each poisoned batch is seen once.
  assert rows[-1]["step"] == 11 and np.isfinite(rows[-1]["loss"])


def test_newest_complete_names_the_newest_finished_save_never_one_in_progress(
    tmp_path, monkeypatch):
  """Catches "the newest checkpoint" read from orbax's latest_step, which counts an
  asynchronous save from its start: a stop would name as intact, and a resume try, a save
  still being written (or about to fail). A real save is held just before its rename."""
  import asyncio  # pylint: disable=g-import-not-at-top  # Here: new tests go at the end.
  import threading  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  from slw_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoints = checkpoint.Checkpoints(str(tmp_path / "checkpoints"), keep=10)
  state = {"w": jax.numpy.arange(4.0)}
  held, release = threading.Event(), threading.Event()
  try:
    assert checkpoints.newest_complete() is None
    for step in (2, 5):
      checkpoints.save(step, state, {"step": step})
      checkpoints.wait()
    assert checkpoints.newest_complete() == 5
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self):  # Orbax's last act: the rename of the temporary directory.
      held.set()
      await asyncio.to_thread(release.wait, 60)
      await finalize(self)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    checkpoints.save(9, state, {"step": 9})
    assert held.wait(60)
    assert checkpoints.latest_step() == 9  # orbax counts it already...
    # ... while it is still a temporary directory.
    assert "9" + checkpoint.TMP_SUFFIX in os.listdir(checkpoints.directory)
    assert checkpoints.newest_complete() == 5
    release.set()
    checkpoints.wait()
    assert checkpoints.newest_complete() == 9
  finally:
    release.set()  # Never leaves orbax's thread waiting.
    checkpoints.close()
