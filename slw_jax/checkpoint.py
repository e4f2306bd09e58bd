"""Checkpoints with orbax: train state (arrays) plus a JSON record (position in the run).

A checkpoint at step k holds the state after k updates, and `meta`: the step, tokens consumed,
the loader state, the monitor state and the config it was written under. Saves are
asynchronous (training continues while orbax writes) and atomic (orbax writes to a temporary
directory and renames it), so a run killed at any moment resumes from the last complete one.
This module saves and restores; when to do so is the trainer's decision.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpoints:

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict):
    """Starts saving (returns at once when asynchronous); a step already saved is kept as is
    (it holds the same state: steps are deterministic). Raises if orbax refuses the save."""
    if step in self._manager.all_steps():
      return
    saved = self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if not saved:
      raise RuntimeError(f"orbax did not save step {step} in {self.directory} (newest there: "
                         f"{self.latest_step()}); refusing to continue without checkpoints")

  def delete_from(self, step: int):
    """Deletes the checkpoints at `step` and after (an abandoned trajectory)."""
    self._manager.wait_until_finished()
    for existing in self.steps():
      if existing >= step:
        self._manager.delete(existing)

  def restore(self, step: int, abstract_state):
    """(state, meta) of a saved step, laid out like `abstract_state` (shapes and shardings)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def read_meta(self, step: int) -> dict:
    """Only the JSON record of a saved step (cheap: no arrays are read)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def wait(self):
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

