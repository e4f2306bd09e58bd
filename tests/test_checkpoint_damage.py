"""Which errors reading a checkpoint mean damage (`checkpoint.is_damage`, `unless_damaged`), and
what a resume does with them (`resume.Restorer.newest_usable`): a damaged checkpoint (cut short,
missing items, garbage) is set aside and the run falls back to an older one; a failing machine
(permissions, I/O, out of memory, an unreachable store) stops the run and never sets a good
checkpoint aside; with several processes a damaged one stops the run instead of a fallback."""

import errno
import json
import os
import shutil

import jax
import numpy as np
import pytest

from slw_jax import checkpoint, errors, resume, trainer


def _caused_by(error, cause):
  """`error` raised `from cause` (as orbax wraps tensorstore's errors in a bare Exception)."""
  error.__cause__ = cause
  return error


def _raised_while_handling(error, context):
  """`error` raised inside an `except` block handling `context`."""
  error.__context__ = context
  return error


# Makers of the errors (a fresh one per test: raising one twice would chain it to itself).
# tensorstore's messages are its own wording of the failures.
DAMAGE = {
    "garbage JSON": lambda: json.JSONDecodeError("Expecting value", "garbage{", 0),
    "missing item": lambda: KeyError('Item "state" was not found in the checkpoint'),
    "missing file": lambda: FileNotFoundError(errno.ENOENT, "No such file or directory",
                                              "meta/metadata"),
    "file cut short": lambda: ValueError('OUT_OF_RANGE: Error reading "w/.zarray" in OCDBT '
                                         "database: Requested byte range [0, 280) is not valid"),
    "garbage bytes": lambda: ValueError("DATA_LOSS: Error decoding b-tree node"),
    "missing chunk": lambda: ValueError('NOT_FOUND: Error opening "zarr" driver'),
    "orbax's wrapper of damage": lambda: _caused_by(
        Exception("restore failed"), ValueError("DATA_LOSS: Error decoding b-tree node")),
    "orbax's wrapper of a missing file": lambda: _caused_by(
        Exception("restore failed"), FileNotFoundError(errno.ENOENT, "No such file", "x")),
}
NOT_DAMAGE = {
    "permission": lambda: PermissionError(errno.EACCES, "Permission denied", "checkpoints/8"),
    "I/O error": lambda: OSError(errno.EIO, "Input/output error", "checkpoints/8/state"),
    "stale NFS handle": lambda: OSError(errno.ESTALE, "Stale file handle", "checkpoints/8"),
    "host out of memory": MemoryError,
    "device out of memory": lambda: jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB"),
    "tensorstore out of memory": lambda: ValueError("RESOURCE_EXHAUSTED: Out of memory"),
    "tensorstore permission": lambda: ValueError('PERMISSION_DENIED: Error opening file "x": '
                                                 "Permission denied"),
    "store unreachable": lambda: ValueError("UNAVAILABLE: Connection reset by peer"),
    "store timeout": lambda: ValueError("DEADLINE_EXCEEDED: Deadline exceeded"),
    "orbax's wrapper of a permission error": lambda: _caused_by(
        Exception("restore failed"), PermissionError(errno.EACCES, "Permission denied", "x")),
    "orbax's wrapper of an I/O error": lambda: _caused_by(
        Exception("restore failed"), OSError(errno.EIO, "Input/output error", "x")),
    "damage-like error while out of memory": lambda: _raised_while_handling(
        KeyError("step"), MemoryError()),
    "a bug": lambda: TypeError("unsupported operand type(s)"),
}


@pytest.mark.parametrize("make_error,damage",
                         [(m, True) for m in DAMAGE.values()] +
                         [(m, False) for m in NOT_DAMAGE.values()],
                         ids=list(DAMAGE) + list(NOT_DAMAGE))
def test_is_damage_tells_damaged_files_from_a_failing_machine(make_error, damage):
  """A bug calling every error damage (or reading only the outermost of orbax's wrapped
  errors) would set good checkpoints aside on a machine failure; one calling none would stop
  every resume at a damaged checkpoint."""
  assert checkpoint.is_damage(make_error()) is damage


def _raise(error):
  raise error


def test_unless_damaged_returns_damage_and_raises_anything_else():
  assert checkpoint.unless_damaged(lambda: 42) == (42, None)
  damage = DAMAGE["garbage bytes"]()
  assert checkpoint.unless_damaged(lambda: _raise(damage)) == (None, damage)
  machine = NOT_DAMAGE["I/O error"]()
  with pytest.raises(OSError) as raised:
    checkpoint.unless_damaged(lambda: _raise(machine))
  assert raised.value is machine  # As it was, not wrapped.


@pytest.fixture(scope="module")
def saved(session_config, tmp_path_factory):
  """(config, workdir) of a run directory with checkpoints 4 and 8 of the test run, written by
  the trainer's own `save` (a state of zeros: nothing trains, nothing compiles)."""
  c = session_config()
  workdir = str(tmp_path_factory.mktemp("two_checkpoints"))
  run = trainer.Trainer(c, workdir)
  zeros = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                       run.state_spec)
  for step in (4, 8):
    run.state, run.step = zeros, step
    run.save()
  run.checkpoints.close()
  run.executables.close()
  return c, workdir


@pytest.fixture
def resumed(saved, tmp_path):
  """resumed() -> (Trainer on a fresh copy of `saved`, set up for nothing yet, and the lines
  its Restorer logs)."""
  c, base = saved
  made = []

  def make():
    workdir = str(tmp_path / "run")
    shutil.copytree(base, workdir)
    run = trainer.Trainer(c, workdir)
    lines = []
    run.restorer.log = lines.append
    made.append(run)
    return run, lines
  yield make
  for run in made:
    run.executables.close()
    run.checkpoints.close()


def _step_files(workdir, step, under=""):
  directory = os.path.join(workdir, "checkpoints", str(step), under)
  return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]


def _cut_array_data_short(workdir):
  for path in _step_files(workdir, 8, "state"):
    if f"{os.sep}d{os.sep}" in path:  # tensorstore's data files (OCDBT).
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _overwrite_array_data(workdir):
  for path in _step_files(workdir, 8, "state"):
    if f"{os.sep}d{os.sep}" in path:
      with open(path, "r+b") as f:
        f.write(b"\xff" * os.path.getsize(path))


CORRUPTIONS = {
    "array data cut short": _cut_array_data_short,
    "array data overwritten": _overwrite_array_data,
    "missing item": lambda w: shutil.rmtree(os.path.join(w, "checkpoints", "8", "state")),
    "garbage record": lambda w: open(os.path.join(w, "checkpoints", "8", "meta", "metadata"),
                                     "w").write("garbage{"),
    "missing record": lambda w: os.remove(os.path.join(w, "checkpoints", "8", "meta",
                                                       "metadata")),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_real_damage_is_set_aside_and_the_resume_falls_back(resumed, corruption):
  """Checkpoint 8 damaged on disk: orbax and tensorstore's real errors read as damage, the
  checkpoint moves to unreadable_checkpoints/ (kept) and the run resumes from 4."""
  run, lines = resumed()
  CORRUPTIONS[corruption](run.workdir)
  step, state, meta = run.restorer.newest_usable(run.schedule.num_steps)
  assert step == 4 and meta["step"] == 4 and int(state["step"]) == 0  # The zeros saved.
  assert os.path.isdir(os.path.join(run.workdir, "unreadable_checkpoints", "step_8"))
  assert run.checkpoints.complete_steps() == [4]
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint 8 in ") and \
      "resuming from step 4" in lines[0]


@pytest.mark.parametrize("reading", ["read_meta", "restore"])
@pytest.mark.parametrize("name", sorted(NOT_DAMAGE))
def test_a_failing_machine_never_sets_a_good_checkpoint_aside(resumed, monkeypatch, reading,
                                                              name):
  """Reading the (whole) newest checkpoint fails as a machine fails: the error stops the run as
  it is, and both checkpoints stay where they are; nothing falls back to step 4."""
  run, lines = resumed()
  error = NOT_DAMAGE[name]()
  read = getattr(checkpoint.Checkpoints, reading)

  def failing(self, step, *args):
    if step == 8:
      raise error
    return read(self, step, *args)
  monkeypatch.setattr(checkpoint.Checkpoints, reading, failing)
  with pytest.raises(type(error)) as raised:
    run.restorer.newest_usable(run.schedule.num_steps)
  assert raised.value is error
  assert run.checkpoints.complete_steps() == [4, 8]
  assert not os.path.exists(os.path.join(run.workdir, "unreadable_checkpoints")) and lines == []


class _TwoProcesses:
  """`jax` as the first of two processes sees it (for resume's namespace only: orbax and the
  rest keep the real single-process jax)."""

  def __getattr__(self, name):
    return getattr(jax, name)

  @staticmethod
  def process_count():
    return 2

  @staticmethod
  def process_index():
    return 0


@pytest.mark.parametrize("corruption", ["array data cut short", "garbage record"])
def test_with_several_processes_a_damaged_checkpoint_stops_instead_of_falling_back(
    resumed, monkeypatch, corruption):
  """The processes cannot agree on a fallback (orbax's barriers would go out of step): the run
  stops naming the damaged checkpoint, and nothing is moved."""
  run, lines = resumed()
  CORRUPTIONS[corruption](run.workdir)
  monkeypatch.setattr(resume, "jax", _TwoProcesses())
  with pytest.raises(errors.StopTraining, match=r"^checkpoint 8 in .*/checkpoints is damaged as "
                     r"process 0 reads it \(.*\): with several processes the run does not fall "
                     r"back by itself; move it out of the directory, then start again$"):
    run.restorer.newest_usable(run.schedule.num_steps)
  assert sorted(os.listdir(os.path.join(run.workdir, "checkpoints"))) == ["4", "8"]
  assert not os.path.exists(os.path.join(run.workdir, "unreadable_checkpoints")) and lines == []
