"""What a resumed run may change, and the journal that makes a rollback survive a crash.

A run resumes from its newest checkpoint under the config it is started with. Some fields may
differ from the saved config and are only logged (evaluation, logging, compile and checkpoint
settings, the mesh, the attention kernel, microbatches); fields of the training recipe (batch
size, token budget, pacing, optimizer, seed, data order) change the learning-rate curve or the
data a step sees, so they are refused unless the user accepts them knowingly
(--allow_schedule_change); the model's shape never changes. The tokens are compared rather
than `data.*` strings (a path may be spelled many ways, data may move): every checkpoint holds
each split's size, checksum and a sampled checksum (`split_fingerprint`); a model imported
with its own tokenizer is checked against the data's vocabulary kind by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from slw_jax import (checkpoint, config_diff, config_lib, errors, input_pipeline, models, run_log,
                     staging, train_step)


class ResumeError(errors.InputError):
  """The workdir's checkpoints cannot be continued with this config or data (one line)."""


# Changes a resume accepts and logs: none of them alters the recipe (the optimizer, the data, the
# schedules); some change how a step computes it (kernels, precision, remat, the fused head) or
# which dropout masks it draws (model.dropout_rng: other masks of the same rate).
ALLOWED_GROUPS = ("eval", "log", "compile", "checkpoint", "monitor", "hardware", "mesh", "tune",
                  "distributed")
ALLOWED_FIELDS = ("data.dir", "data.cache_dir", "data.source", "data.vocab", "data.prefetch",
                  "data.verify_max_bytes", "data.tfds_data_dir", "data.hf_train_split",
                  "data.hf_val_split", "model.attention",
                  "model.attention_block", "model.remat", "model.scan_layers", "model.dtype",
                  "model.loss_head", "model.loss_chunk_tokens", "model.dropout_rng",
                  "optim.microbatches")
SHOWN = 3  # Schedule changes named in the error line (then "and N more").


def classify(field: str, param_shaping: tuple[str, ...]) -> str:
  """"allowed", "never" (the parameters' shapes) or "schedule" (any other field: the recipe
  of the run, so that a field added later is refused until classified)."""
  if field.split(".")[0] in ALLOWED_GROUPS or field in ALLOWED_FIELDS:
    return "allowed"
  if field in {f"model.{name}" for name in param_shaping}:
    return "never"
  return "schedule"


def check_config(saved: dict, current: dict, param_shaping: tuple[str, ...], where: str,
                 allow_schedule_change: bool) -> tuple[list[str], list[str]]:
  """(allowed changes, accepted schedule changes) as "a.b=X there, Y here" lines.

  Raises ResumeError naming the first field that may not change: a model shape or vocabulary
  field always, a schedule field unless `allow_schedule_change`. `where` names the checkpoint.
  """
  found = {"allowed": [], "never": [], "schedule": []}
  for difference in config_diff.differences(saved, current):
    found[classify(difference[0], param_shaping)].append(
        config_diff.describe_difference(difference))
  if found["never"]:
    raise ResumeError(f"{where} holds checkpoints of another model ({found['never'][0]}): use "
                      "a new --workdir or the same model config")
  if found["schedule"] and not allow_schedule_change:
    more = len(found["schedule"]) - SHOWN
    listed = "; ".join(found["schedule"][:SHOWN]) + (f"; and {more} more" if more > 0 else "")
    raise ResumeError(
        f"{where} was trained with another recipe, which would change the learning-rate curve "
        "or the data order: resume with the saved values, or pass --allow_schedule_change to "
        f"accept the change knowingly ({listed})")
  return found["allowed"], found["schedule"]


def check_checkpoint(meta: dict, c, workdir: str, num_steps: int, fingerprint: dict,
                     param_shaping: tuple[str, ...], allow_schedule_change: bool):
  """`check_config` and `check_data` of a checkpoint's record (`meta`) against this run's
  config `c` and data `fingerprint`; also refuses a checkpoint past the config's last step,
  or whose model reads other token ids than this run's data (a GPT-2 imported with its own
  tokenizer). Returns check_config's changes."""
  where = f"--workdir={workdir}"
  if meta["step"] > num_steps:
    raise ResumeError(f"{where} holds checkpoint {meta['step']}, past this config's last step "
                      f"{num_steps}: its train_tokens / train_steps end earlier than the run "
                      "already went")
  changes = check_config(config_diff.saved_defaults(meta["config"]), c.to_dict(), param_shaping,
                         where, allow_schedule_change)
  check_data(meta.get("data"), fingerprint, f"checkpoint {meta['step']}",
             c.data.dir or c.data.source)
  recorded = checkpoint.model_vocab(meta, c.data.vocab, workdir)
  if checkpoint.reads_other_ids(recorded, c.data.vocab):
    raise ResumeError(f"{where} holds a model imported with the tokenizer {recorded} but "
                      f"config.data.vocab={c.data.vocab!r}: training would feed it other token "
                      f"ids (train on data prepared with --config.data.vocab={recorded})")
  return changes


def data_fingerprint(c, train_tokens: np.ndarray, validation_tokens: np.ndarray) -> dict:
  """{split: split_fingerprint} of a run's data, with the sha256 preparation recorded."""
  sums = {} if input_pipeline.is_megatron(c.data) else input_pipeline.read_metadata(
      staging.local_dir(c.data))["splits"]
  return {split: split_fingerprint(tokens, sums.get(split, {}).get("sha256"))
          for split, tokens in (("train", train_tokens), ("validation", validation_tokens))}


SAMPLES, SAMPLE_TOKENS = 64, 4096  # Sampled checksum: 64 evenly spaced runs of 4096 tokens.


def split_fingerprint(tokens: np.ndarray, sha256: str | None = None) -> dict:
  """The size and a sampled sha256 of one split's tokens, cheap at any size (a full checksum
  of a 100 GB corpus would take minutes at every start), plus the full-file `sha256` that
  preparation recorded, where there is one (a Megatron pair has none)."""
  starts = np.linspace(0, max(len(tokens) - SAMPLE_TOKENS, 0), SAMPLES).astype(np.int64)
  digest = hashlib.sha256()
  for start in np.unique(starts):
    digest.update(np.asarray(tokens[start:start + SAMPLE_TOKENS]).tobytes())
  fingerprint = {"tokens": int(len(tokens)), "dtype": str(tokens.dtype),
                 "sample_sha256": digest.hexdigest()}
  return {**fingerprint, "sha256": sha256} if sha256 else fingerprint


def check_data(saved: dict | None, current: dict, where: str, data_dir: str):
  """Raises ResumeError when the token files differ from those the checkpoint trained on
  (`saved`: {split: split_fingerprint}; None for checkpoints of older releases: unchecked)."""
  for split, then in (saved or {}).items():
    now = current.get(split)
    if now != then:
      what = ("its tokens differ (sha256)" if now and now["tokens"] == then["tokens"]
              else f"{then['tokens']:,} tokens there, {now['tokens'] if now else 0:,} here")
      raise ResumeError(
          f"the {split!r} token files of data.dir={data_dir!r} changed since {where} was "
          f"saved ({what}): resume with the data it trained on, or start a new --workdir")


JOURNAL = "rollback.json"


def write_journal(workdir: str, target: int, loader: dict, monitor: dict, events: list[dict],
                  pacing: dict | None = None):
  """Records a rollback before any checkpoint is deleted: resume from `target` with this
  loader position (past the bad batch), monitor state and adaptive pacing state (that of the
  target: None for a fixed schedule), whatever the newest checkpoint, and log its `events`
  (if the crash came before they were)."""
  journal = {"target": target, "loader": loader, "monitor": monitor, "events": events}
  if pacing is not None:
    journal["pacing"] = pacing
  run_log.write_json(os.path.join(workdir, JOURNAL), journal)


def read_journal(workdir: str) -> dict | None:
  """The unfinished rollback's record, or None. A journal cut short (a kill while writing is
  impossible: it is renamed into place) or unreadable is an error, not silence."""
  path = os.path.join(workdir, JOURNAL)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ResumeError(f"{path} is unreadable ({error}): delete it to resume from the newest "
                      "checkpoint (the rollback it recorded will then be redone)") from None


def clear_journal(workdir: str):
  """Called once a checkpoint after the rollback's target is on disk."""
  path = os.path.join(workdir, JOURNAL)
  if os.path.exists(path):
    os.remove(path)


class Restorer:
  """A run's side of its checkpoints before and during training: which one to resume from
  (the newest that reads back whole; damaged newer ones set aside, never deleted), reading it
  in this run's layout, the config and data checks of a resume, and the rollback journal.
  Errors that stop the run are `errors.StopTraining`, naming the checkpoint and what to do."""

  def __init__(self, c, workdir: str, checkpoints: checkpoint.Checkpoints, placed, devices,
               data: dict, param_shaping: tuple[str, ...], allow_schedule_change: bool,
               log, primary: bool):
    self.c, self.workdir, self.checkpoints, self.log = c, workdir, checkpoints, log
    self.placed, self.devices, self.data = placed, devices, data
    self.param_shaping, self.allow_schedule_change = param_shaping, allow_schedule_change
    self.primary = primary
    self.config_changes = ([], [])  # (allowed, schedule) of the checkpoint checked last.
    self.journal_target = None  # The step of a rollback whose journal is still needed.

  def check(self, meta: dict, num_steps: int):
    """Refuses a checkpoint this run cannot continue (check_checkpoint)."""
    try:
      self.config_changes = check_checkpoint(meta, self.c, self.workdir, num_steps, self.data,
                                             self.param_shaping, self.allow_schedule_change)
    except ResumeError as error:
      raise errors.StopTraining(str(error)) from None

  def newest_meta(self) -> dict | None:
    """The newest checkpoint's record (cheap: no arrays); None when there is none or it is
    unreadable (dealt with by `newest_usable`)."""
    latest = self.checkpoints.newest_complete()
    try:
      return None if latest is None else self.checkpoints.read_meta(latest)
    except Exception:  # pylint: disable=broad-except  # Unreadable: set aside later.
      return None

  def newest_usable(self, num_steps: int):
    """(step, state, meta) of the newest checkpoint that reads back whole; None when none is
    saved. Damaged newer ones (truncated files, missing items, garbage metadata:
    `checkpoint.is_damage`) are set aside with a warning; when every one is damaged the run
    stops. Other errors (out of memory, I/O) stop the run as they are."""
    unreadable = []
    for step in reversed(self.checkpoints.steps()):
      meta, error = checkpoint.unless_damaged(lambda: self.checkpoints.read_meta(step))
      if error is None:
        self.check(meta, num_steps)  # A config mismatch is not damage: it stops the run.
        restored, error = checkpoint.unless_damaged(lambda: self.restore(step))
      if error is None:
        for bad, bad_error in unreadable:
          self._set_aside(bad, bad_error, step)
        return (step, *restored)
      if jax.process_count() > 1:
        # The processes cannot agree on a fallback without orbax's own barriers going out of
        # step (a process that failed skipped them): stop, naming it; the others time out.
        raise errors.StopTraining(
            f"checkpoint {step} in {self.checkpoints.directory} is damaged as process "
            f"{jax.process_index()} reads it ({errors.one_line(error, 200)}): with several "
            "processes the run does not fall back by itself; move it out of the directory, "
            "then start again")
      unreadable.append((step, error))
    if unreadable:
      listed = "; ".join(f"step {k}: {errors.one_line(e, 100)}" for k, e in unreadable)
      raise errors.StopTraining(f"every checkpoint in {self.checkpoints.directory} is "
                                f"unreadable: restore them from a backup, or start a new "
                                f"--workdir ({listed})")
    return None

  def _set_aside(self, step: int, error: Exception, resumed: int):
    moved = self.checkpoints.set_aside(step, os.path.join(self.workdir, "unreadable_checkpoints"))
    self.log(f"warning: checkpoint {step} in {self.checkpoints.directory} is unreadable "
             f"({errors.one_line(error, 200)}); moved to {moved}, resuming from step {resumed}")

  def restore(self, step: int):
    """(state, meta) of checkpoint `step`, laid out as this run's: a checkpoint saved with the
    other model.scan_layers is read in its own layout and its blocks restacked (logged)."""
    saved = config_diff.saved_defaults(self.checkpoints.read_meta(step)["config"])
    scanned = saved["model"]["scan_layers"]
    if scanned == self.c.model.scan_layers:
      return self.checkpoints.restore(step, self.placed.state_spec)
    config = config_lib.with_overrides(self.c, {"model.scan_layers": scanned})
    saved_spec = train_step.on_mesh(config, self.devices).state_spec
    state, meta = self.checkpoints.restore(step, saved_spec)
    restack = jax.jit(lambda s: models.restack_blocks(s, self.placed.state_spec,
                                                      self.c.model.n_layer),
                      out_shardings=self.placed.layout.state)
    self.log(f"checkpoint {step} has model.scan_layers={scanned}: blocks restacked for "
             f"model.scan_layers={self.c.model.scan_layers}")
    return restack(state), meta

  def read_journal(self) -> dict | None:
    try:
      return read_journal(self.workdir)
    except ResumeError as error:
      raise errors.StopTraining(str(error)) from None

  def clear_journal(self, journal: dict | None):
    if journal is not None and self.primary:
      clear_journal(self.workdir)

  def resume_point(self, num_steps: int):
    """(step, state, meta, events) to resume from, or None when nothing is saved. An
    unfinished rollback (its journal names the newest usable checkpoint) continues from its
    target past the bad batch: `meta` then holds the journal's loader, monitor and pacing
    state, and `events` its events, to log again."""
    journal = self.read_journal()
    found = self.newest_usable(num_steps)
    if found is None or journal is None or journal["target"] != found[0]:
      # A later checkpoint already holds the rollback's data position (the process died
      # before it removed the journal), or its target is gone: the journal is spent.
      self.clear_journal(journal)
      return None if found is None else (*found, [])
    step, state, meta = found
    meta = {**meta, "loader": journal["loader"], "monitor": journal["monitor"],
            "pacing": journal.get("pacing", meta.get("pacing"))}
    self.journal_target = step
    self.log(f"continuing the rollback to step {step} recorded in {JOURNAL}")
    return step, state, meta, journal.get("events", [])

  def continue_from(self, step: int, meta: dict, loader, monitor):
    """Puts the `loader` and the `monitor` where checkpoint `step` (its record `meta`) left
    them, and logs the settings changed since; an accepted recipe change is also an event
    (events.jsonl), so the run's record says where its schedule changed."""
    note = loader.restore(meta["loader"])
    if note:
      self.log(note)
    monitor.load_state(meta["monitor"])
    allowed, schedule = self.config_changes
    if allowed:
      self.log(f"resuming with changed settings: {'; '.join(allowed)}")
    if schedule:
      self.log(f"resuming with a changed recipe (--allow_schedule_change): {'; '.join(schedule)}")
      monitor.event(step, "schedule_change", changes="; ".join(schedule))

  def log_resumed(self, step: int, meta: dict, tokens_before: int):
    """Says where the run resumed; notes when this config's schedule reaches `step` after
    other than the checkpoint's tokens (`tokens_before`)."""
    if meta["tokens"] != tokens_before:
      self.log(f"note: the checkpoint's step {step} came after {meta['tokens']:,} tokens but "
               f"this config's schedule reaches it after {tokens_before:,}: the pacing or "
               "batch schedule changed since it was saved (e.g. a seqlen_start now rounded "
               "down); the run continues on this config's schedule")
    self.log(f"resumed from step {step} ({meta['tokens']:,} tokens) in {self.workdir}")

  def roll_back(self, bad_step: int, position_after_bad: int, loader, monitor, log, free_state):
    """The checkpoint side of a rollback from `bad_step` (Trainer._rollback): the journal
    written first, then the events logged, the old train state freed (`free_state`: peak
    memory stays one state), the target's state restored, and the `loader` (past the bad batch)
    and the `monitor` (its counters, plus one rollback) set to the target's. Returns (target,
    its record with the restored "state")."""
    limit = self.c.monitor.max_rollbacks
    if monitor.rollbacks >= limit:
      raise errors.StopTraining(f"step {bad_step} is unstable again after monitor.max_rollbacks="
                                f"{limit} rollbacks: lower optim.lr or lengthen "
                                "pacing.duration_steps, then resume from the checkpoints")
    target, saved = self.rollback_target(bad_step, position_after_bad, monitor.rollbacks + 1)
    monitor.event(bad_step, "rollback", to_step=target,  # `rollback`: its ordinal, so that
                  skipped_batches=bad_step + 1 - target,  # two alike stay two.
                  rollback=saved["monitor"]["rollbacks"])
    events = monitor.pop_events()
    self.write_journal(target, saved, events)
    log.events(events)  # A resume logs them again from the journal: RunLog skips repeats.
    free_state()
    state, _ = self.restore(target)
    loader.restore(saved["loader"])
    monitor.load_state(saved["monitor"])
    return target, {**saved, "state": state}

  def rollback_target(self, bad_step: int, position_after_bad: int, rollbacks: int):
    """(target, record) of a rollback from `bad_step`: the newest checkpoint at or before it,
    and its record with the data position past the bad batch and the `rollbacks` count."""
    self.checkpoints.wait()
    target = max(k for k in self.checkpoints.steps() if k <= bad_step)
    saved = self.checkpoints.read_meta(target)
    return target, {**saved, "loader": {**saved["loader"], "position": position_after_bad},
                    "monitor": {**saved["monitor"], "rollbacks": rollbacks}}

  def write_journal(self, target: int, record: dict, events: list[dict]):
    """A rollback to `target` (with `rollback_target`'s `record`) begins: its journal is needed
    until a later checkpoint."""
    if self.primary:
      write_journal(self.workdir, target, record["loader"], record["monitor"], events,
                    record.get("pacing"))
    self.journal_target = target

  def clear_spent_journal(self, step: int):
    """The rollback's journal goes once a checkpoint after its target (at `step`) is on disk
    (waits for it)."""
    if self.journal_target is not None and step > self.journal_target:
      self.checkpoints.wait()
      self.clear_journal({})
      self.journal_target = None
