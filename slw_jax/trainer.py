"""The training loop: wires pacing, data, the bucketed step, the monitor and checkpoints.

Step t trains on `schedule.seqlen[t] x schedule.batch_size[t]` tokens at `lrs[t]`; everything
a step depends on is a function of (config, t, checkpointed state), so a resumed run continues
exactly. Under adaptive pacing the schedule is redrawn after each of the controller's length
changes (slw_jax.adaptive), and its state is part of the checkpointed state. Metrics of step t
are read while step t + 1 runs (one step in flight), so the loop never waits on the device just
to log.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from slw_jax import (attention, checkpoint, compiled_steps, distributed, errors, hardware,
                     input_pipeline, models, monitor, pacing, preemption, resume, run_log, run_plan,
                     sharding, train_step, wandb_log)


PARAM_SHAPING = models.GPTConfig.param_shaping_fields()  # Must match to resume.


# What an imported checkpoint records (slw_jax.convert) and every later checkpoint keeps: where
# the weights came from and their special token ids (exported back to Hugging Face's config).
CARRIED_META = ("imported_from", "special_tokens")


class BadStepsStop(errors.StopTraining):
  """monitor.max_bad_in_a_row bad steps in a row: the run diverged (checkpoints are kept)."""


class Trainer:
  """One run in `workdir`. `run()` trains to the end (or to a stop signal).

  `allow_schedule_change`: resume checkpoints saved under another recipe (batch size, token
  budget, pacing, optimizer; see slw_jax.resume), recording the change as an event.
  """

  def __init__(self, c, workdir: str, devices=None, allow_schedule_change: bool = False):
    self.c, self.workdir, self.devices = c, workdir, devices
    self.primary = jax.process_index() == 0
    self.log = None  # The run's log (run_log.RunLog), opened when the loop starts.
    # Each step's length, batch size and LR, redrawn after each adaptive pacing change.
    self.plan = run_plan.RunPlan(c)
    hardware.check_accelerator(c.hardware.allow_cpu)
    # The mesh, batch, attention and microbatch checks come before the data is prepared and
    # before any compile: bad input fails fast. The model, optimizer and layout are built once.
    placed = train_step.on_mesh(c, devices)
    self.model_cfg = placed.model_cfg
    self.layout, self.state_spec, self.num_params = placed.layout, placed.state_spec, \
        placed.num_params
    sharding.check_batch_sizes(self.layout, self.plan.batch_sizes())
    self.largest = pacing.largest_bucket(self.plan.buckets)
    if c.optim.microbatches != "auto":
      compiled_steps.check_microbatches(c.optim.microbatches, self.largest,
                                        self.layout.batch_shards)
    self.loader, self.val_index = input_pipeline.open_run_data(c, self.layout.process_rows,
                                                               self._print)
    # Saved with every checkpoint: a resume on other token files is refused.
    self.data_fingerprint = resume.data_fingerprint(c, self.loader.index.tokens,
                                                    self.val_index.tokens)
    hardware.enable_compilation_cache(c.compile.cache_dir)
    self.on_device = train_step.sharded_steps(
        c, placed, skip_bad=c.monitor.action == "skip", background=c.compile.background,
        on_compiled=self._log_compiled, threads=c.compile.threads)
    self.executables = self.on_device.executables  # One compiled train step per bucket.
    self.checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                              c.checkpoint.keep, c.checkpoint.async_save,
                                              cleanup_tmp=self.primary)
    self.monitor = monitor.StabilityMonitor(c.monitor)
    self.restorer = resume.Restorer(c, workdir, self.checkpoints, placed, devices,
                                    self.data_fingerprint, PARAM_SHAPING, allow_schedule_change,
                                    self._print, self.primary)
    self.peak_flops, self.peak_source = hardware.peak_flops(c.hardware.peak_flops, c.model.dtype)
    self.stop = preemption.Stop(c.checkpoint.preemption_timeout_s)
    self.state, self.step = None, 0
    self.carried_meta = {}  # Kept from the checkpoint resumed (CARRIED_META).
    self.validation = train_step.Validation(c.eval, self.val_index, self.layout,
                                            self.executables, self.on_device.eval,
                                            self.state_spec["params"], c.pacing.seqlen_end)
    self.last_eval = {}  # The last evaluation's row.
    self.started = self.last_done = None  # Wall time of run(); perf_counter of the last step.
    self.batch_iter, self.stall_before_loop = None, None
    self.wandb = wandb_log.open_for(c, workdir, self.primary)  # Last; W&B refuses pre-compile.

  def _print(self, message: str):
    if self.primary:
      print(message, flush=True)

  def _log_compiled(self, stats: compiled_steps.BucketStats):
    (self.log.info if self.log is not None else self._print)(stats.line())

  # ----- setup -------------------------------------------------------------------------------

  def setup(self):
    """Everything before step 0: the first bucket to run compiles in the background while the
    largest one compiles for the memory check; then the state is restored or initialized while
    the next buckets and the eval step (by when each is first needed) compile behind it."""
    start = self.checkpoints.latest_step() or 0
    first = self.schedule.bucket_shape(start) if start < self.schedule.num_steps else None
    try:
      self._check_newest_resumable()
      for line in attention.attention_lines(self.model_cfg,
                                            sorted({b.seqlen for b in self.plan.buckets})):
        self._print(line)
      compiled_steps.check_memory(self.executables, self.c.optim.microbatches, self.largest,
                                  self.layout.batch_shards, first, self._print)
      self._prefetch_upcoming(start)
      self.validation.compile(start, self.schedule.num_steps)
      self.restore_or_init()
    except BaseException:
      self._abort()  # Stops compiles queued for a run that won't start; finishes W&B's run.
      raise

  def _check_newest_resumable(self):
    """The config and data checks of a resume, on the newest checkpoint's record, before
    anything compiles; an unreadable one is dealt with in restore_or_init."""
    meta = self.restorer.newest_meta()
    if meta is not None:
      self.restorer.check(meta, self.schedule.num_steps)
      if self.pacer is not None and meta.get("pacing"):  # Its buckets compile ahead from here.
        self.plan.restore(meta, meta["step"])

  def restore_or_init(self):
    found = self.restorer.resume_point(self.schedule.num_steps)
    if found is None:
      # Compiled here, beside the first bucket's compile in the pool.
      init = self.executables.compile_other("init", self.on_device.init, here=True).result()
      self.state, self.step = init(), 0
      self.save()  # A step-0 checkpoint: rollback always has a state older than any spike.
      return
    self.step, self.state, meta, journal_events = found
    self.monitor.events.extend(journal_events)  # Logged at the first step.
    self.carried_meta = {k: meta[k] for k in CARRIED_META if k in meta}
    self.restorer.continue_from(self.step, meta, self.loader, self.monitor)
    if self.pacer is not None:
      self._restore_pacing(meta, self.step)
    self.restorer.log_resumed(self.step, meta, int(self.schedule.tokens_before[self.step]))

  # ----- adaptive pacing ---------------------------------------------------------------------

  @property
  def schedule(self) -> pacing.Schedule:
    return self.plan.schedule

  @property
  def lrs(self):
    return self.plan.lrs

  @property
  def pacer(self):
    """The adaptive pacing controller (slw_jax.adaptive), or None for fixed pacing."""
    return self.plan.pacer

  def _restore_pacing(self, meta: dict, step: int):
    note = self.plan.restore(meta, step)
    if note:
      self._print(note)

  def _decide_pacing(self, t: int, row: dict):
    """The controller's decision at the end of a window (an event); after a change the
    batches still queued (at the old lengths) are drawn again."""
    decision, changed = self.plan.observe(t, row)
    if decision is not None:
      self.log.events([decision])
    if changed:
      self.batch_iter.close()
      self.batch_iter = self._batches()

  # ----- the loop ----------------------------------------------------------------------------

  def save(self):
    meta = checkpoint.record(self.step, int(self.schedule.tokens_before[self.step]),
                             self.loader.state(), self.monitor.state(), self.c.to_dict(),
                             data=self.data_fingerprint, **self.plan.checkpoint_meta(),
                             **self.carried_meta)
    self.checkpoints.save(self.step, self.state, meta)
    if self.stop.signal is None:  # Stopping: the preemption deadline bounds the wait (_finish).
      self.restorer.clear_spent_journal(self.step)

  def _batches(self):
    shapes = (self.schedule.shape(t) for t in range(self.step, self.schedule.num_steps))
    return self.loader.prefetch(shapes, self.c.data.prefetch)

  def _prefetch_upcoming(self, step: int):
    for shape, priority in self.plan.to_compile(step):
      self.executables.prefetch([shape], priority=priority)

  def run(self) -> dict:
    if self.state is None:
      self.setup()
    self.started = time.time()
    try:
      self._open_log()
      with preemption.StopOnSignal(self.stop.on_signal):
        self._loop()
      return self._finish()
    except OSError as error:
      self._abort()
      if error.errno not in checkpoint.STORAGE_FULL_OR_LOCKED:
        raise
      raise checkpoint.storage_stop(error, self.workdir,
                                    self.checkpoints.newest_complete()) from error
    except BaseException:
      self._abort()
      raise

  def _open_log(self):
    self.log = run_log.RunLog(self.workdir, lambda: self.schedule.num_steps,
                              self.schedule.total_tokens, self.step,
                              int(self.schedule.tokens_before[self.step]),
                              self.c.log.print_every_steps, self.primary, self.wandb)
    self.log.info(f"training {self.num_params:,} parameters for {self.schedule.num_steps:,} steps "
                  f"({self.schedule.total_tokens:,} tokens) in {len(self.plan.buckets)} "
                  f"buckets; MFU against {self.peak_flops:.3g} FLOP/s ({self.peak_source})")
    for line in self.layout.describe():
      self.log.info(line)

  def _abort(self):
    """On an error: stop the data and compile threads, let started saves finish. Each part is
    cleaned up even if another fails (a full disk fails them all): the error raised is the
    first one, never one from the cleanup."""
    if self.batch_iter is not None:
      _quietly(self.batch_iter.close)
    _quietly(lambda: self.executables.close(wait=False))
    _quietly(self.checkpoints.close)
    for part in filter(None, (self.log, self.wandb)):  # A second close is a no-op.
      _quietly(part.close)

  def _loop(self):
    self.stall_before_loop = None
    self.batch_iter, pending = self._batches(), None
    self.last_done = time.perf_counter()
    while True:
      running = self.step < self.schedule.num_steps and not self.stop.agreed(self.step)
      launched = self._launch() if running else None
      if pending is not None and self._settle(pending):
        pending = None  # Rolled back: the step just launched belonged to the discarded past.
        continue
      pending = launched
      if not running:
        break
      if self._due(self.c.eval.every_steps) or self._due(self.c.checkpoint.every_steps):
        rolled_back, pending = self._settle(pending), None
        if not rolled_back:
          self._periodic()
    self.batch_iter.close()

  def _launch(self):
    """Dispatches step `self.step` (asynchronously) and returns (step, device metrics)."""
    t = self.step
    self.executables.release(
        self.plan.to_release(t, self.executables.live_shapes()))
    self._prefetch_upcoming(t)
    bucket = self.schedule.bucket_shape(t)
    executable = self.executables.get(bucket)
    if self.stall_before_loop is None:  # The first bucket always compiles before step 0.
      self.stall_before_loop = self.executables.stall_s
    batch = next(self.batch_iter)
    batch = self.layout.global_batch(train_step.padded_batch(batch, bucket[1]), bucket[0])
    self.state, metrics = executable(self.state, batch, np.float32(self.lrs[t]))
    self.step = t + 1
    return t, metrics, self.loader.position  # The position just after step t's batch.

  def _settle(self, pending) -> bool:
    """Finishes a launched step; returns True when it triggered a rollback."""
    step, metrics, position_after = pending
    action = self._finish_step(step, metrics)
    if action == "stop":
      self._stop_on_bad_steps(step)
    if action != "rollback":
      return False
    self._rollback(step, position_after)
    return True

  def _stop_on_bad_steps(self, step: int):
    """Stops after monitor.max_bad_in_a_row bad steps in a row, naming the newest checkpoint
    saved before them (none is saved during a streak of applied bad updates: `_periodic`)."""
    self.checkpoints.wait()
    raise BadStepsStop(self.monitor.bad_steps_stop(step, self.checkpoints.steps(),
                                                   f"{self.workdir}/checkpoints"))

  def _periodic(self):
    if self._due(self.c.eval.every_steps):
      self.evaluate()
    # During a streak of bad updates that were applied (log), the state may hold NaN: no save.
    streak = self.monitor.bad_in_a_row and self.c.monitor.action != "skip"
    if self._due(self.c.checkpoint.every_steps) and not streak:
      self.save()
    self.last_done = time.perf_counter()  # Keep eval/save time out of the next step's time.

  def _due(self, every: int) -> bool:
    return self.step % every == 0

  def _finish_step(self, t: int, metrics) -> str | None:
    """Reads step t's metrics (waits for the device), logs them, asks the monitor."""
    values = sharding.fetch(metrics)
    now = time.perf_counter()
    step_time, self.last_done = now - self.last_done, now
    batch_size, seqlen = self.schedule.shape(t)
    flops = batch_size * seqlen * models.train_flops_per_token(self.model_cfg, seqlen,
                                                               self.num_params)
    row = run_log.step_row(t, int(self.schedule.tokens_before[t]), (batch_size, seqlen),
                           float(self.lrs[t]), values, step_time,
                           flops / (self.peak_flops * self.layout.mesh.size))
    if t % self.c.log.every_steps == 0 or t == self.schedule.num_steps - 1 or row.get("skipped"):
      self.log.step(row, int(self.schedule.tokens_before[t + 1]))
    action = self.monitor.observe(t, {**row, "skipped": bool(values["skipped"])})
    self.log.events(self.monitor.pop_events())
    if self.pacer is not None:
      self._decide_pacing(t, row)
    return action

  def _rollback(self, bad_step: int, position_after_bad: int):
    """Restores the newest checkpoint at or before `bad_step` and skips the data up to and
    including the bad step's batch; the monitor's counters come back with the state (replayed
    steps are not counted twice), plus one rollback.

    Crash-safe at every moment: nothing is deleted (no checkpoint after the target exists: a
    step is saved only once the step before it was checked), and the target keeps its record;
    a journal (slw_jax.resume) holds the data position past the bad batch and the monitor
    state, for a resume before the next checkpoint, which makes it spent.
    """
    target, saved = self.restorer.roll_back(bad_step, position_after_bad, self.loader,
                                            self.monitor, self.log, self._free_state)
    self.state = saved.pop("state")
    if self.pacer is not None:  # The lengths of the target's past, and its controller.
      self._restore_pacing(saved, target)
    self.batch_iter.close()
    self.step = target
    self.batch_iter = self._batches()
    self.last_done = time.perf_counter()

  def _free_state(self):
    """Deletes the train state's device buffers (after the step computing them finishes)."""
    jax.block_until_ready(self.state)
    for leaf in jax.tree.leaves(self.state):
      leaf.delete()
    self.state = None

  def evaluate(self) -> dict:
    """Validation loss and perplexity at full length over `eval.batches` batches."""
    loss = self.validation.loss(self.state["params"], self.step, self.schedule.num_steps)
    row = {"step": self.step, "tokens": int(self.schedule.tokens_before[self.step]),
           "val_loss": loss, "val_ppl": run_log.perplexity(loss),
           "elapsed_s": time.time() - self.started}
    self.log.eval(row)
    self.last_eval = row
    return row

  # ----- the end -----------------------------------------------------------------------------

  def _final_save(self) -> bool:
    """Saves the last step; False when the save was abandoned at the preemption deadline (a
    save still running from before, which orbax would wait for first, counts too). Every
    process takes the same decision: orbax's save begins with a barrier across them."""
    ready = self.stop.waited_in_time(self.checkpoints.wait) and self.stop.seconds_left() > 0
    if not distributed.everywhere(ready):
      return False
    self.save()
    if not distributed.everywhere(self.stop.waited_in_time(self.checkpoints.wait)):
      return False
    self.restorer.clear_spent_journal(self.step)
    self.checkpoints.close()
    return True

  def _finish(self) -> dict:
    completed = self.step >= self.schedule.num_steps
    if completed and self.last_eval.get("step") != self.step:
      self.evaluate()
    saved = self._final_save()
    if not saved:
      self.log.info(f"abandoned the save of step {self.step}: not finished "
                    f"checkpoint.preemption_timeout_s={self.c.checkpoint.preemption_timeout_s} s "
                    f"after {self.stop.signal}; the newest complete checkpoint is step "
                    f"{self.checkpoints.newest_complete()}")
    # Queued compiles are cancelled; after a stop, running ones are waited for until the deadline.
    left_running = self.executables.close(
        timeout=self.stop.seconds_left() if self.stop.signal else None)
    if self.pacer is not None:  # The processes took the same changes (a difference is a bug).
      agreed = self.plan.agreement(distributed.gather(self.pacer.digest()))
      if agreed:
        self._print(agreed)
    summary = run_log.summary(
        completed=completed, stopped_by=self.stop.signal, steps=self.step,
        schedule=self.schedule, wall_time_s=time.time() - self.started,
        last_eval=self.last_eval, executables=self.executables,
        stall_before_loop=self.stall_before_loop, stability=self.monitor.summary(),
        save_abandoned=not saved, pacing=self.plan.summary(),
        left_running=left_running + ([] if saved else [f"the save of step {self.step}"]))
    self.log.finish(summary, self.executables.stall_s)
    return summary


def _quietly(cleanup):
  """Runs a cleanup whose own error must not hide the error in flight."""
  try:
    cleanup()
  except Exception:  # pylint: disable=broad-except  # Reported by the error in flight.
    pass


def train(c, workdir: str) -> dict:
  """Trains a validated config in `workdir` (resuming from its checkpoints); returns the summary."""
  return Trainer(c, workdir).run()
