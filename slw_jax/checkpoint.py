"""Checkpoints with orbax: train state (arrays) plus a JSON record (position in the run).

A checkpoint at step k holds the state after k updates, and `meta`: the step, tokens consumed,
the loader state, the monitor state and the config it was written under. Saves are
asynchronous (training continues while orbax writes) and atomic (orbax writes to a temporary
directory and renames it), so a run killed at any moment resumes from the last complete one.
This module saves and restores; when to do so is the trainer's decision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil

import orbax.checkpoint as ocp

from slw_jax import config_diff, data_spec, errors


TMP_SUFFIX = ".orbax-checkpoint-tmp"  # A save in progress (renamed to its step when complete).


class SaveError(RuntimeError):
  """A checkpoint could not be written (disk full, directory not writable); the checkpoints
  written before it are intact (orbax renames a save into place only once it is complete)."""


# What storage says when a write fails, as the C library words it (tensorstore's and
# Python's errors both carry it inside longer text).
STORAGE_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "File too large")


# Write errors (errno) that mean the storage is full or locked: the run's outputs then fail
# with one line, the checkpoints written before intact.
STORAGE_FULL_OR_LOCKED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.EFBIG)


def storage_stop(error: OSError, workdir: str, newest: int | None) -> errors.StopTraining:
  """The stop of a run whose outputs in `workdir` could not be written (a full or read-only
  disk: STORAGE_FULL_OR_LOCKED), naming its `newest` complete checkpoint
  (`Checkpoints.newest_complete`)."""
  where = f": {error.filename}" if error.filename else ""
  intact = ("no checkpoint was saved yet" if newest is None else
            f"the complete checkpoints (newest: step {newest}) are intact")
  return errors.StopTraining(
      f"could not write the run's outputs in {workdir} ({storage_reason(error)}{where}); "
      f"{intact}: free disk space or make the directory writable, then resume")


def storage_reason(error: BaseException) -> str:
  """The storage failure behind `error` in a few words (or its first line, shortened)."""
  text = str(error)
  for reason in STORAGE_REASONS:
    if reason in text:
      return reason
  return errors.one_line(error, 120)


# tensorstore statuses (in its ValueError's text) of a machine or storage failing, not of the
# files being damaged: a checkpoint read with them may be whole.
MACHINE_STATUSES = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "ABORTED", "CANCELLED", "UNKNOWN")
REQUIRED_META = ("step", "tokens", "loader", "monitor", "config")


def is_damage(error: BaseException) -> bool:
  """Whether an error reading a checkpoint means its files are damaged (cut short, missing,
  garbage: JSON, orbax and tensorstore say so with ValueError, KeyError or a bare Exception
  wrapping one) rather than the machine failing (out of memory, I/O errors, permissions, an
  unreachable store), which must never send a good checkpoint aside. The whole chain of
  causes is read: orbax wraps tensorstore's errors in a bare Exception."""
  chain, seen = [], error
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for cause in chain:
    if isinstance(cause, (MemoryError, OSError)) and not isinstance(cause, FileNotFoundError):
      return False
    if any(f"{status}:" in str(cause) for status in MACHINE_STATUSES):
      return False
  return isinstance(error, (ValueError, KeyError, FileNotFoundError)) or type(error) is Exception  # pylint: disable=unidiomatic-typecheck


def _writable(directory: str) -> bool:
  """False on a read-only directory (its half-written saves cannot go; the run then stops
  with one line at its first write, not with a traceback from orbax's cleanup thread)."""
  return not os.path.isdir(directory) or os.access(directory, os.W_OK)


def unless_damaged(read):
  """(read(), None), or (None, error) when reading failed because the checkpoint is damaged
  (`is_damage`); any other error is raised."""
  try:
    return read(), None
  except Exception as error:  # pylint: disable=broad-except  # Sorted by is_damage.
    if is_damage(error):
      return None, error
    raise


class Checkpoints:

  def __init__(self, directory: str, keep: int, async_save: bool = True,
               cleanup_tmp: bool = False):
    # cleanup_tmp: a save a killed run left half-written goes when the run starts again (else
    # it stays until that step is saved again, maybe never). Only the run that writes the
    # directory may: a reader (evaluate, convert) would delete a live run's save in progress.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=cleanup_tmp and
                                           _writable(directory))
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving = None  # The step of the newest save started (its error may come later).

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def complete_steps(self) -> list[int]:
    """The steps whose save finished, as the directory shows them now (a save in progress is
    still a temporary directory; orbax renames it to its step when complete)."""
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

  def newest_complete(self) -> int | None:
    """The newest step whose save finished (`complete_steps`), None when none did: the
    checkpoint a stop names as intact and a resume tries first. Not `latest_step`: orbax counts
    a save from the moment it starts (an asynchronous one may still be writing, or fail) and
    sees the directory only as of its last `reload`."""
    return max(self.complete_steps(), default=None)

  def save(self, step: int, state, meta: dict):
    """Starts saving (returns at once when asynchronous); a step already saved is kept as is
    (it holds the same state: steps are deterministic). Raises if orbax refuses the save."""
    if step in self._manager.all_steps():
      return
    with self._reporting_save_errors(step):  # Also raises an earlier async save's error.
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._saving = step
    if not saved:
      raise RuntimeError(f"orbax did not save step {step} in {self.directory} (newest there: "
                         f"{self.latest_step()}); refusing to continue without checkpoints")

  @contextlib.contextmanager
  def _reporting_save_errors(self, step: int | None):
    """Turns a failed write into one SaveError line naming the step, the directory and the
    newest checkpoint still intact."""
    try:
      yield
    except SaveError:
      raise
    except Exception as error:  # pylint: disable=broad-except  # orbax and tensorstore's own.
      intact = self.newest_complete()
      newest = "none was saved yet" if intact is None else f"newest: step {intact}"
      # An asynchronous save's error comes with the next call: name the save that failed.
      if self._saving is not None and self._saving not in self.complete_steps():
        step = self._saving
      raise SaveError(f"could not save checkpoint {step} in {self.directory} "
                      f"({storage_reason(error)}); the checkpoints saved before it are intact "
                      f"({newest}): free disk space or make the directory writable, then "
                      f"resume (details: {errors.one_line(error, 300)})") from error

  def set_aside(self, step: int, where: str) -> str:
    """Moves an unreadable checkpoint out of the directory (kept for inspection: nothing is
    deleted) so that it is neither resumed nor mistaken for a saved step; returns its path."""
    os.makedirs(where, exist_ok=True)
    moved = os.path.join(where, f"step_{step}")
    while os.path.exists(moved):
      moved += "_again"
    shutil.move(os.path.join(self.directory, str(step)), moved)
    self.reload()
    return moved

  def reload(self):
    """Lists the saved steps again (after another process changed the directory)."""
    self._manager.reload()

  def restore(self, step: int, abstract_state):
    """(state, meta) of a saved step, laid out like `abstract_state` (shapes and shardings)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_params(self, step: int, abstract_params):
    """(params, meta) of a saved step: only the parameters are read (no optimizer state, which
    is about twice their size)."""
    item = {"params": abstract_params}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(item)),
        meta=ocp.args.JsonRestore()))
    return restored["state"]["params"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    """Only the JSON record of a saved step (cheap: no arrays are read); KeyError when it
    lacks a field every record has (damaged)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    missing = [k for k in REQUIRED_META if k not in (restored["meta"] or {})]
    if missing:
      raise KeyError(f"checkpoint {step}'s record lacks {', '.join(missing)}")
    return restored["meta"]

  def wait(self):
    """Blocks until every started save is on disk; raises SaveError if one failed."""
    with self._reporting_save_errors(self._saving):
      self._manager.wait_until_finished()

  def close(self):
    self.wait()
    self._manager.close()


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A run's parameters, for inference or conversion."""
  config: object  # The run's config, on a one-device mesh.
  step: int
  graphdef: object  # nnx.merge(graphdef, params) is the model.
  params: object
  meta: dict  # The checkpoint's JSON record (see Trainer.save).
  vocab: str | None  # The vocabulary its model reads; None: unknown (see `model_vocab`).


def model_vocab(meta: dict, data_vocab: str, workdir: str) -> str | None:
  """The vocabulary a checkpoint's model reads. An imported GPT-2 (slw_jax.convert) records
  its own: a tokenizer directory inside the workdir, or None when no tokenizer came with the
  weights. Any other checkpoint reads its run's `data.vocab`."""
  if "vocab" not in meta:
    return data_vocab
  kind, _, path = (meta["vocab"] or "").partition(":")
  if kind == "gpt2" and not os.path.isabs(path):
    return f"gpt2:{os.path.join(workdir, path)}"  # Relative: the run directory may move.
  return meta["vocab"]


def reads_other_ids(model_vocab_spec: str | None, data_vocab: str) -> bool:
  """Whether a model reading `model_vocab_spec` (`model_vocab`) would be fed other token ids
  by data prepared with `data_vocab`. Kinds are compared, not paths (spelled many ways)."""
  kind = lambda spec: data_spec.split_spec(spec, "byte")[0]  # noqa: E731
  return model_vocab_spec is not None and kind(model_vocab_spec) != kind(data_vocab)


def record(step: int, tokens: int, loader: dict, monitor: dict, config: dict, **extra) -> dict:
  """The JSON record saved with every checkpoint (`meta`): the position in the run (step,
  tokens consumed, `Loader.state()`, `StabilityMonitor.state()`), the config, and `extra`."""
  return {"step": step, "tokens": tokens, "loader": loader, "monitor": monitor,
          "config": config, **extra}


def load_params(workdir: str, step: int | None = None) -> Loaded:
  """The parameters of a run's newest (or `step`) checkpoint, on this process's first device.

  Raises ValueError naming the directory or step when there is nothing to load.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from slw_jax import train_step  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise errors.UsageError(f"--workdir={workdir} has no checkpoints/ (a run directory of "
                            "slw_jax.main)")
  checkpoints = Checkpoints(directory, keep=1_000_000, async_save=False)
  try:
    saved = checkpoints.steps()
    if not saved:
      raise errors.UsageError(f"--workdir={workdir} has no checkpoint saved yet")
    step = saved[-1] if step is None else step
    if step not in saved:
      raise errors.UsageError(f"--step={step} is not a checkpoint in {directory} (saved: {saved})")
    c = config_diff.on_one_device(checkpoints.read_meta(step)["config"])
    placed = train_step.on_mesh(c, jax.devices()[:1])
    params, meta = checkpoints.restore_params(step, placed.state_spec["params"])
  finally:
    checkpoints.close()
  return Loaded(c, step, placed.graphdef, params, meta, model_vocab(meta, c.data.vocab, workdir))
