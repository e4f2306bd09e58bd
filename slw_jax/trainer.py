"""The training loop: wires pacing, data, the bucketed step, the monitor and checkpoints.

Step t trains on `schedule.seqlen[t] x schedule.batch_size[t]` tokens at `lrs[t]`; everything
a step depends on is a function of (config, t, checkpointed state), so a resumed run continues
exactly. Under adaptive pacing the schedule is redrawn after each of the controller's length
changes (slw_jax.adaptive), and its state is part of the checkpointed state. Metrics of step t
are read while step t + 1 runs (one step in flight), so the loop never waits on the device just
to log.
"""

from __future__ import annotations

import bisect
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from slw_jax import (adaptive, checkpoint, compile_cache, config_lib, distributed, hardware,
                     input_pipeline, models, monitor, pacing, preemption, reporting, resume,
                     schedules, sharding, train_step)


PARAM_SHAPING = models.GPTConfig.param_shaping_fields()  # Must match to resume.


# What an imported checkpoint records (slw_jax.convert) and every later checkpoint keeps: where
# the weights came from and their special token ids (exported back to Hugging Face's config).
CARRIED_META = ("imported_from", "special_tokens")


class StopTraining(RuntimeError):
  """The run cannot continue (e.g. too many rollbacks); checkpoints are kept."""


class BadStepsStop(StopTraining):
  """monitor.max_bad_in_a_row bad steps in a row: the run diverged (checkpoints are kept)."""


class Trainer:
  """One run in `workdir`. `run()` trains to the end (or to a stop signal).

  `allow_schedule_change`: resume checkpoints saved under another recipe (batch size, token
  budget, pacing, optimizer; see slw_jax.resume), recording the change as an event.
  """

  def __init__(self, c, workdir: str, devices=None, allow_schedule_change: bool = False):
    self.c, self.workdir, self.devices = c, workdir, devices
    self.allow_schedule_change = allow_schedule_change
    # Adaptive pacing: the controller decides lengths online and the schedule is redrawn after
    # each change (_replan); until then it is the slowest one, so its checks cover every run.
    self.pacer = adaptive.Controller(c) if c.pacing.kind == "adaptive" else None
    self.schedule = pacing.run_schedule(c)
    self.lrs = schedules.learning_rates(c, self.schedule)
    self.buckets = self.schedule.buckets()  # Computed once: np.unique over every step.
    self._first_steps = [b.first_step for b in self.buckets]  # Ascending: order of first use.
    self._release_after = {}  # Step -> buckets whose last step it is (released 2 steps on).
    for b in self.buckets:
      self._release_after.setdefault(b.last_step, []).append((b.batch_size, b.seqlen))
    self.primary = jax.process_index() == 0
    self.model_cfg = models.GPTConfig.from_config(c.model)
    hardware.check_accelerator(c.hardware.allow_cpu)
    # The mesh, batch, attention and microbatch checks come before the data is prepared and
    # before any compile: bad input fails fast.
    placed = train_step.on_mesh(c, devices)
    self.layout, self.state_spec = placed.layout, placed.state_spec
    sharding.check_batch_sizes(self.layout, self._batch_sizes())
    self.largest = pacing.largest_bucket(self.buckets)
    if c.optim.microbatches != "auto":
      compile_cache.check_microbatches(c.optim.microbatches, self.largest,
                                       self.layout.batch_shards)
    # One process prepares missing data; the others wait for it (a Megatron pair is read as is).
    if jax.process_count() > 1 and not input_pipeline.is_megatron(c.data):
      input_pipeline.require_corpus(c.data)
      distributed.first_process_does(lambda: input_pipeline.ensure_prepared(c, log=self._print),
                                     f"preparing data.dir={c.data.dir!r}")
      input_pipeline.check_prepared_here(c.data.dir, jax.process_index())
    self.loader, self.val_index = input_pipeline.open_training_data(
        c, *self.layout.process_rows, log=self._print)
    # Saved with every checkpoint: a resume on other token files is refused.
    self.data_fingerprint = resume.data_fingerprint(c, self.loader.index.tokens,
                                                    self.val_index.tokens)
    hardware.enable_compilation_cache(c.compile.cache_dir)
    self.device = train_step.sharded_steps(
        c, placed, skip_bad=c.monitor.action == "skip", background=c.compile.background,
        on_compiled=self._log_compiled, threads=c.compile.threads)
    self.steps = self.device.steps
    self.checkpoints = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"),
                                              c.checkpoint.keep, c.checkpoint.async_save,
                                              cleanup_tmp=self.primary)
    self.monitor = monitor.StabilityMonitor(c.monitor)
    self.num_params = placed.num_params
    self.peak_flops, self.peak_source = hardware.peak_flops(c.hardware.peak_flops, c.model.dtype)
    self.stop_signal, self._stop_before, self.stop_time = None, None, None
    self.state, self.step = None, 0
    self._journal_target = None  # The step of a rollback whose journal is still needed.
    self.carried_meta = {}  # Kept from the checkpoint resumed (CARRIED_META).

  def _batch_sizes(self) -> dict[str, int]:
    sizes = {"config.batch_size": self.c.batch_size, "config.eval.batch_size":
             self.c.eval.batch_size}
    for b in self.buckets:
      sizes.setdefault(f"the batch size at step {b.first_step} (config.batch_warmup.start and "
                       ".multiple)", b.batch_size)
    return sizes

  def _print(self, message: str):
    if self.primary:
      print(message, flush=True)

  def _log_compiled(self, stats: compile_cache.BucketStats):
    where = "in the background" if stats.background else "while the loop waited"
    message = (f"compiled bucket {stats.batch_size}x{stats.seqlen} {where} in "
               f"{stats.compile_s:.1f} s ({stats.microbatches} microbatch(es)); needs "
               f"{stats.memory_bytes / 2**20:.1f} MiB")
    log = getattr(self, "log", None)
    (log.info if log is not None else self._print)(message)

  # ----- setup -------------------------------------------------------------------------------

  def check_memory(self, first: tuple[int, int] | None = None):
    """Chooses the microbatch counts (optim.microbatches) and, where the device reports its
    memory, compiles the largest bucket and stops if it cannot fit. The `first` bucket to run
    compiles in the background meanwhile (after the search when `auto` must compile to
    choose). A CPU reports no limit: nothing to check, the largest bucket compiles in its turn.
    """
    shape, limit = self.largest, hardware.device_memory_limit()
    if limit and jax.process_count() > 1:  # Every process must search with the same budget.
      limit = int(multihost_utils.process_allgather(np.int64(limit)).min())
    for line in models.attention_lines(self.model_cfg, sorted({b.seqlen for b in self.buckets})):
      self._print(line)
    # Compiles only for `auto` against a memory limit; then `first` needs its counts.
    policy, line = compile_cache.choose_microbatches(self.steps, self.c.optim.microbatches, shape,
                                                     self.layout.batch_shards, limit)
    self._print(line)
    if self.steps.compiler_options:
      self._print("compiler options of every train step: " + ", ".join(
          f"{k}={v}" for k, v in sorted(self.steps.compiler_options.items())))
    self.steps.prefetch([first] if first else [], priority=-1)
    if not limit:
      self._print(f"largest bucket {shape[0]}x{shape[1]}: the device reports no memory limit, "
                  "so there is nothing to check before step 0")
      return
    self.steps.get(shape)
    need = self.steps.stats[shape].memory_bytes
    if need > limit:
      more = ("" if policy.largest_count == compile_cache.microbatch_options(
          shape[0], self.layout.batch_shards)[-1] else "optim.microbatches=auto (or more), ")
      raise StopTraining(
          f"the largest bucket (batch {shape[0]} x seqlen {shape[1]}) needs {need / 2**30:.2f} "
          f"GiB per device with {policy.largest_count} microbatch(es) but the device has "
          f"{limit / 2**30:.2f} GiB: set {more}model.remat=block, model.dtype=bfloat16, "
          "compile.xla_remat=true (XLA recomputes to fit), or use more devices (mesh.fsdp)")
    self._print(f"largest bucket {shape[0]}x{shape[1]} needs {need / 2**30:.3f} GiB of "
                f"{limit / 2**30:.2f} GiB")

  def restore_or_init(self):
    journal = self._read_journal()
    found = self._newest_usable()
    if found is None:
      self._clear_journal(journal)
      # Compiled here, beside the first bucket's compile in the pool.
      init = self.steps.compile_other("init", self.device.init, here=True).result()
      self.state, self.step = init(), 0
      self.save()  # A step-0 checkpoint: rollback always has a state older than any spike.
      return
    latest, self.state, meta = found
    if journal is not None and journal["target"] == latest:
      # A rollback the process did not outlive: from its target, past the bad batch.
      meta = {**meta, "loader": journal["loader"], "monitor": journal["monitor"],
              "pacing": journal.get("pacing", meta.get("pacing"))}
      self._journal_target = latest
      self.monitor.events.extend(journal.get("events", []))  # Logged at the first step.
      self._print(f"continuing the rollback to step {latest} recorded in {resume.JOURNAL}")
    else:
      # A later checkpoint already holds the rollback's data position (the process died
      # before it removed the journal), or its target is gone: the journal is spent.
      self._clear_journal(journal)
    self.carried_meta = {k: meta[k] for k in CARRIED_META if k in meta}
    note = self.loader.restore(meta["loader"])
    if note:
      self._print(note)
    self.monitor.load_state(meta["monitor"])
    self.step = latest
    self._log_config_changes(latest)
    if self.pacer is not None:
      self._restore_pacing(meta, latest)
    if meta["tokens"] != int(self.schedule.tokens_before[latest]):
      self._print(f"note: the checkpoint's step {latest} came after {meta['tokens']:,} tokens but "
                  f"this config's schedule reaches it after "
                  f"{int(self.schedule.tokens_before[latest]):,}: the pacing or batch schedule "
                  "changed since it was saved (e.g. a seqlen_start now rounded down); the run "
                  "continues on this config's schedule")
    self._print(f"resumed from step {latest} ({meta['tokens']:,} tokens) in {self.workdir}")

  def _restore_pacing(self, meta: dict, step: int):
    """The controller's state from a checkpoint's record, and the run redrawn from it. A
    fixed schedule's checkpoint (resumed as adaptive under --allow_schedule_change) starts the
    controller at the rung at or below the length that schedule had reached."""
    state = meta.get("pacing")
    if state is None:
      saved = config_lib.on_one_device(meta["config"])
      reached = int(pacing.run_schedule(saved).seqlen[max(step - 1, 0)]) if step else 0
      rungs = [r for r in self.pacer.rungs if r <= reached] or self.pacer.rungs[:1]
      state = {**self.pacer.state(), "changes": [[0, rungs[0]]] + (
          [[step, rungs[-1]]] if rungs[-1] > rungs[0] else [])}
      self._print(f"the checkpoint of step {step} has a fixed schedule (pacing.kind="
                  f"{saved.pacing.kind!r}): adaptive pacing continues from seqlen {rungs[-1]}")
    self.pacer.load_state(state)
    self._replan()

  def _replan(self):
    """Adaptive pacing: the run redrawn from the controller's changes (lengths, LRs, steps)."""
    self.schedule = pacing.run_schedule(self.c, self.pacer.changes)
    self.lrs = schedules.learning_rates(self.c, self.schedule)
    if getattr(self, "log", None) is not None:
      self.log.total_steps = self.schedule.num_steps

  def _clear_journal(self, journal: dict | None):
    if journal is not None and self.primary:
      resume.clear_journal(self.workdir)

  def _read_journal(self) -> dict | None:
    try:
      return resume.read_journal(self.workdir)
    except resume.ResumeError as error:
      raise StopTraining(str(error)) from None

  def _newest_usable(self):
    """(step, state, meta) of the newest checkpoint that reads back whole; None when none is
    saved. Damaged newer ones (truncated files, missing items, garbage metadata:
    `checkpoint.is_damage`) are set aside with a warning, never deleted; when every one is
    damaged the run stops. Other errors (out of memory, I/O) stop the run as they are."""
    unreadable = []
    for step in reversed(self.checkpoints.steps()):
      meta, error = checkpoint.unless_damaged(lambda: self.checkpoints.read_meta(step))
      if error is None:
        self._check_resumable(meta)  # A config mismatch is not damage: it stops the run.
        restored, error = checkpoint.unless_damaged(lambda: self._restore(step))
      if error is None:
        for bad, bad_error in unreadable:
          self._set_aside(bad, bad_error, step)
        return (step, *restored)
      if jax.process_count() > 1:
        # The processes cannot agree on a fallback without orbax's own barriers going out of
        # step (a process that failed skipped them): stop, naming it; the others time out.
        raise StopTraining(f"checkpoint {step} in {self.checkpoints.directory} is damaged as "
                           f"process {jax.process_index()} reads it "
                           f"({config_lib.one_line(error, 200)}): with several processes the "
                           "run does not fall back by itself; move it out of the directory, "
                           "then start again")
      unreadable.append((step, error))
    if unreadable:
      listed = "; ".join(f"step {k}: {config_lib.one_line(e, 100)}" for k, e in unreadable)
      raise StopTraining(f"every checkpoint in {self.checkpoints.directory} is unreadable: "
                         f"restore them from a backup, or start a new --workdir ({listed})")
    return None

  def _everywhere(self, ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    if jax.process_count() == 1:
      return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())

  def _set_aside(self, step: int, error: Exception, resumed: int):
    moved = self.checkpoints.set_aside(step, os.path.join(self.workdir, "unreadable_checkpoints"))
    self._print(f"warning: checkpoint {step} in {self.checkpoints.directory} is unreadable "
                f"({config_lib.one_line(error, 200)}); moved to {moved}, resuming from step "
                f"{resumed}")

  def _restore(self, step: int):
    """(state, meta) of checkpoint `step`, laid out as this run's: a checkpoint saved with the
    other model.scan_layers is read in its own layout and its blocks restacked (logged)."""
    saved = config_lib.saved_defaults(self.checkpoints.read_meta(step)["config"])
    scanned = saved["model"]["scan_layers"]
    if scanned == self.model_cfg.scan_layers:
      return self.checkpoints.restore(step, self.state_spec)
    config = config_lib.with_overrides(self.c, {"model.scan_layers": scanned})
    saved_spec = train_step.on_mesh(config, self.devices).state_spec
    state, meta = self.checkpoints.restore(step, saved_spec)
    restack = jax.jit(lambda s: models.restack_blocks(s, self.state_spec, self.c.model.n_layer),
                      out_shardings=self.layout.state)
    self._print(f"checkpoint {step} has model.scan_layers={scanned}: blocks restacked for "
                f"model.scan_layers={self.model_cfg.scan_layers}")
    return restack(state), meta

  def _check_resumable(self, meta: dict):
    """Refuses a checkpoint this run cannot continue (slw_jax.resume.check_checkpoint)."""
    try:
      self._config_changes = resume.check_checkpoint(
          meta, self.c, self.workdir, self.schedule.num_steps, self.data_fingerprint,
          PARAM_SHAPING, self.allow_schedule_change)
    except resume.ResumeError as error:
      raise StopTraining(str(error)) from None

  def _log_config_changes(self, step: int):
    """Logs the settings changed since the checkpoint; an accepted recipe change is also an
    event (events.jsonl), so the run's record says where its schedule changed."""
    allowed, schedule = self._config_changes
    if allowed:
      self._print(f"resuming with changed settings: {'; '.join(allowed)}")
    if schedule:
      self._print(f"resuming with a changed recipe (--allow_schedule_change): "
                  f"{'; '.join(schedule)}")
      self.monitor.event(step, "schedule_change", changes="; ".join(schedule))

  def save(self):
    meta = checkpoint.record(self.step, int(self.schedule.tokens_before[self.step]),
                             self.loader.state(), self.monitor.state(), self.c.to_dict(),
                             data=self.data_fingerprint, **self._pacing_meta(),
                             **self.carried_meta)
    self.checkpoints.save(self.step, self.state, meta)
    if self.stop_signal is None:  # Stopping: the preemption deadline bounds the wait (_finish).
      self._clear_spent_journal()

  def _check_pacing_agrees(self):
    """Every process decided the same lengths: they read the same global metrics, so a
    difference is a bug (raised as one; it would also have desynchronized the steps)."""
    if jax.process_count() == 1:
      return
    everyone = np.asarray(multihost_utils.process_allgather(np.int64(self.pacer.digest())))
    everyone = everyone.ravel()
    if len(set(everyone.tolist())) != 1:
      raise RuntimeError(f"adaptive pacing decided differently on the processes (digests "
                         f"{everyone.tolist()}; this one's changes: {self.pacer.changes})")
    self._print(f"adaptive pacing: the {jax.process_count()} processes took the same "
                f"{len(self.pacer.changes) - 1} length change(s)")

  def _pacing_meta(self) -> dict:
    return {} if self.pacer is None else {"pacing": self.pacer.state()}

  def _clear_spent_journal(self):
    """The rollback's journal goes once a later checkpoint is on disk (waits for it)."""
    if self._journal_target is not None and self.step > self._journal_target:
      self.checkpoints.wait()
      self._clear_journal({})
      self._journal_target = None

  # ----- the loop ----------------------------------------------------------------------------

  def _batches(self):
    shapes = (self.schedule.shape(t) for t in range(self.step, self.schedule.num_steps))
    return self.loader.prefetch(shapes, self.c.data.prefetch)

  def _prefetch_upcoming(self, step: int):
    """Queues the next `compile.ahead` buckets (at least `compile.threads`, unless ahead is 0)
    first used after `step`, each at the priority of its first step. Adaptive pacing: the
    bucket of `step` and the next rung's (the first step a growth can reach)."""
    if self.pacer is not None:
      batch_size, seqlen = self.schedule.bucket_shape(step)
      self.steps.prefetch([(batch_size, seqlen)], priority=step)
      if self.c.compile.ahead:
        self.steps.prefetch([(batch_size, self._bucket_of(self.pacer.next_rung(seqlen)))],
                            priority=step + self.c.pacing.adaptive.every_steps)
      return
    ahead = self.c.compile.ahead and max(self.c.compile.ahead, self.c.compile.threads)
    start = bisect.bisect_right(self._first_steps, step)
    for b in self.buckets[start:start + ahead]:
      self.steps.prefetch([(b.batch_size, b.seqlen)], priority=b.first_step)

  def _finished_buckets(self, step: int) -> list[tuple[int, int]]:
    """Buckets whose last step is `step - 2`: their executables can go (the step before
    `step` may still be running on the device). Earlier ones went at their own turn, or were
    never compiled by this process (a resumed run). Adaptive pacing: those shorter than the
    buckets of `step` and `step - 1`, and than the previous rung's while a backoff can come."""
    if self.pacer is None:
      return self._release_after.get(step - 2, [])
    keep = min(int(self.schedule.compiled_seqlen[k]) for k in (max(step - 1, 0), step))
    if self.c.pacing.adaptive.backoff:
      keep = min(keep, self._bucket_of(self.pacer.previous_rung(keep)))
    return [shape for shape in self.steps.live_shapes() if shape[1] < keep]

  def _bucket_of(self, seqlen: int) -> int:
    return int(pacing.padded_lengths(seqlen, self.c.compile.pad_multiple,
                                     self.c.pacing.seqlen_end))

  def setup(self):
    """Everything before step 0: the first bucket to run compiles in the background while the
    largest one compiles for the memory check; then the state is restored or initialized while
    the next buckets and the eval step (by when each is first needed) compile behind it."""
    start = self.checkpoints.latest_step() or 0
    first = self.schedule.bucket_shape(start) if start < self.schedule.num_steps else None
    try:
      self._check_newest_resumable()
      self.check_memory(first)
      self._prefetch_upcoming(start)
      self._compile_eval(start)
      self.restore_or_init()
    except BaseException:
      self.steps.close(wait=False)  # Stops compiles queued for a run that will not start.
      raise

  def _check_newest_resumable(self):
    """The config and data checks of a resume, on the newest checkpoint's record (cheap: no
    arrays), before anything compiles; an unreadable one is dealt with in restore_or_init."""
    latest = self.checkpoints.latest_step()
    try:
      meta = None if latest is None else self.checkpoints.read_meta(latest)
    except Exception:  # pylint: disable=broad-except  # Unreadable: set aside later.
      meta = None
    if meta is not None:
      self._check_resumable(meta)
      if self.pacer is not None and meta.get("pacing"):  # Its buckets compile ahead from here.
        self.pacer.load_state(meta["pacing"])
        self._replan()

  def _compile_eval(self, start: int):
    """Queues the eval step's compile at the priority of the first evaluation after `start`."""
    first_eval = (start // self.c.eval.every_steps + 1) * self.c.eval.every_steps
    self._eval_step = self.steps.compile_other(
        "eval", self.device.eval, self.state_spec["params"],
        compile_cache.batch_spec(self.c.eval.batch_size, self.c.pacing.seqlen_end,
                                 self.layout.batch),
        priority=min(first_eval, self.schedule.num_steps))

  def run(self) -> dict:
    if self.state is None:
      self.setup()
    self.started = time.time()
    try:
      self._open_log()
      with preemption.StopOnSignal(self._on_signal):
        self._loop()
      return self._finish()
    except OSError as error:
      self._abort()
      if error.errno not in checkpoint.STORAGE_FULL_OR_LOCKED:
        raise
      where = f": {error.filename}" if error.filename else ""
      raise StopTraining(f"could not write the run's outputs in {self.workdir} "
                         f"({checkpoint.storage_reason(error)}{where}); the complete checkpoints "
                         f"(newest: step {max(self.checkpoints.complete_steps(), default=None)})"
                         " are intact: free disk space or make the directory writable, then "
                         "resume") from error
    except BaseException:
      self._abort()
      raise

  def _open_log(self):
    self.log = reporting.RunLog(self.workdir, self.schedule.num_steps, self.schedule.total_tokens,
                                self.step, int(self.schedule.tokens_before[self.step]),
                                self.c.log.print_every_steps, self.primary)
    self.log.info(f"training {self.num_params:,} parameters for {self.schedule.num_steps:,} steps "
                  f"({self.schedule.total_tokens:,} tokens) in {len(self.buckets)} "
                  f"buckets; MFU against {self.peak_flops:.3g} FLOP/s ({self.peak_source})")
    mesh = " x ".join(f"{k}={v}" for k, v in self.layout.mesh.shape.items())
    self.log.info(f"mesh {mesh} over {self.layout.mesh.size} devices in {jax.process_count()} "
                  f"process(es); this one loads batch rows block {self.layout.process_rows}")
    for note in self.layout.replicated_dims:
      self.log.info(f"replicated, not sharded: {note}")

  def _abort(self):
    """On an error: stop the data and compile threads, let started saves finish. Each part is
    cleaned up even if another fails (a full disk fails them all): the error raised is the
    first one, never one from the cleanup."""
    iterator, log = getattr(self, "_batch_iter", None), getattr(self, "log", None)
    for cleanup in (iterator.close if iterator is not None else None,
                    lambda: self.steps.close(wait=False), self.checkpoints.close,
                    log.close if log is not None else None):
      try:
        if cleanup is not None:
          cleanup()
      except Exception:  # pylint: disable=broad-except  # Reported by the error in flight.
        pass

  def _loop(self):
    self._stall_before_loop = None
    self._batch_iter, pending = self._batches(), None
    self._last_done = time.perf_counter()
    while True:
      running = self.step < self.schedule.num_steps and not self._stop_agreed()
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
    self._batch_iter.close()

  def _stop_agreed(self) -> bool:
    """Whether to stop before launching `self.step`. With several processes, all stop before the
    same step, so a signal that reached any one of them stops every one."""
    if jax.process_count() == 1:
      return self.stop_signal is not None
    if self._stop_before is None and distributed.stop_agreed(self.stop_signal is not None):
      self._stop_before = self.step  # Kept: a rollback trains back up to it.
    if self._stop_before is None or self.step < self._stop_before:
      return False
    self.stop_signal = self.stop_signal or "signal to one of the processes"
    self.stop_time = self.stop_time or time.monotonic()
    return True

  def _launch(self):
    """Dispatches step `self.step` (asynchronously) and returns (step, device metrics)."""
    t = self.step
    self.steps.release(self._finished_buckets(t))
    self._prefetch_upcoming(t)
    bucket = self.schedule.bucket_shape(t)
    executable = self.steps.get(bucket)
    if self._stall_before_loop is None:  # The first bucket always compiles before step 0.
      self._stall_before_loop = self.steps.stall_s
    batch = next(self._batch_iter)
    batch = self.layout.global_batch(padded_batch(batch, bucket[1]), bucket[0])
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
    m, count = self.c.monitor, self.monitor.bad_in_a_row
    self.checkpoints.wait()
    first_bad = step - count + 1  # Consecutive in the data; a rollback may have rewound steps.
    clean = [k for k in self.checkpoints.steps() if m.action == "skip" or k <= first_bad]
    newest = f"the newest before them: step {max(clean)}" if clean else "none before them"
    raise BadStepsStop(
        f"the last {count} steps (up to step {step}) were all bad (monitor.max_bad_in_a_row="
        f"{m.max_bad_in_a_row}: non-finite loss or gradient norm, or loss ratio above "
        f"monitor.skip_ratio={m.skip_ratio}); stopped with the checkpoints kept in "
        f"{self.workdir}/checkpoints ({newest}): lower optim.lr or lengthen "
        "pacing.duration_steps, then resume")

  def _periodic(self):
    if self._due(self.c.eval.every_steps):
      self.evaluate()
    # During a streak of bad updates that were applied (log), the state may hold NaN: no save.
    streak = self.monitor.bad_in_a_row and self.c.monitor.action != "skip"
    if self._due(self.c.checkpoint.every_steps) and not streak:
      self.save()
    self._last_done = time.perf_counter()  # Keep eval/save time out of the next step's time.

  def _due(self, every: int) -> bool:
    return self.step % every == 0

  def _finish_step(self, t: int, metrics) -> str | None:
    """Reads step t's metrics (waits for the device), logs them, asks the monitor."""
    values = sharding.fetch(metrics)
    now = time.perf_counter()
    step_time, self._last_done = now - self._last_done, now
    batch_size, seqlen = self.schedule.shape(t)
    tokens = batch_size * seqlen  # Real tokens: a padded bucket's padding is not counted.
    flops = tokens * models.train_flops_per_token(self.model_cfg, seqlen, self.num_params)
    row = {"step": t, "tokens": int(self.schedule.tokens_before[t]), "seqlen": seqlen,
           "batch_size": batch_size, "lr": float(self.lrs[t]),
           **{k: float(values[k]) for k in ("loss", "loss_ratio", "grad_norm", "adam_nu_l1",
                                            "adam_nu_max")},
           "step_time_s": step_time, "tokens_per_s": tokens / step_time,
           "mfu": flops / step_time / (self.peak_flops * self.layout.mesh.size)}
    if "z_loss" in values:  # optim.z_loss > 0 only: rows without it had no z-loss.
      row["z_loss"] = float(values["z_loss"])
    if bool(values["skipped"]):
      row["skipped"] = True
    if t % self.c.log.every_steps == 0 or t == self.schedule.num_steps - 1 or row.get("skipped"):
      self.log.step(row, int(self.schedule.tokens_before[t + 1]))
    action = self.monitor.observe(t, {**row, "skipped": bool(values["skipped"])})
    self.log.events(self.monitor.pop_events())
    if self.pacer is not None:
      self._decide_pacing(t, row)
    return action

  def _decide_pacing(self, t: int, row: dict):
    """Adaptive pacing: the controller's decision at the end of a window (an event); after a
    change the run is redrawn and the batches still queued (at the old lengths) drawn again."""
    changes = len(self.pacer.changes)
    decision = self.pacer.observe(t, row)
    if decision is not None:
      self.log.events([decision])
    if len(self.pacer.changes) != changes:
      self._replan()
      self._batch_iter.close()
      self._batch_iter = self._batches()

  def _rollback(self, bad_step: int, position_after_bad: int):
    """Restores the newest checkpoint at or before `bad_step` and skips the data up to and
    including the bad step's batch; the monitor's counters come back with the state (replayed
    steps are not counted twice), plus one rollback.

    Crash-safe at every moment: nothing is deleted (no checkpoint after the target exists: a
    step is saved only once the step before it was checked), and the target keeps its record;
    a journal (slw_jax.resume) holds the data position past the bad batch and the monitor
    state, for a resume before the next checkpoint, which makes it spent.
    """
    if self.monitor.rollbacks >= self.c.monitor.max_rollbacks:
      raise StopTraining(f"step {bad_step} is unstable again after monitor.max_rollbacks="
                         f"{self.c.monitor.max_rollbacks} rollbacks: lower optim.lr or lengthen "
                         "pacing.duration_steps, then resume from the checkpoints")
    self.checkpoints.wait()
    target = max(k for k in self.checkpoints.steps() if k <= bad_step)
    saved = self.checkpoints.read_meta(target)
    loader = {**saved["loader"], "position": position_after_bad}
    counters = {**saved["monitor"], "rollbacks": self.monitor.rollbacks + 1}
    pacing_state = saved.get("pacing")
    self.monitor.event(bad_step, "rollback", to_step=target,  # `rollback`: its ordinal, so
                       skipped_batches=bad_step + 1 - target,  # that two alike stay two.
                       rollback=counters["rollbacks"])
    events = self.monitor.pop_events()
    if self.primary:
      resume.write_journal(self.workdir, target, loader, counters, events, pacing_state)
    self.log.events(events)  # A resume logs them again from the journal: RunLog skips repeats.
    self._journal_target = target
    self._free_state()  # Before the restore: peak memory stays one train state.
    self.state, _ = self._restore(target)
    self.loader.restore(loader)
    self.monitor.load_state(counters)
    if self.pacer is not None:  # The lengths of the target's past, and its controller.
      self._restore_pacing({**saved, "pacing": pacing_state}, target)
    self._batch_iter.close()
    self.step = target
    self._batch_iter = self._batches()
    self._last_done = time.perf_counter()

  def _free_state(self):
    """Deletes the train state's device buffers (after the step computing them finishes)."""
    jax.block_until_ready(self.state)
    for leaf in jax.tree.leaves(self.state):
      leaf.delete()
    self.state = None

  def evaluate(self) -> dict:
    """Validation loss and perplexity at full length over `eval.batches` batches."""
    sums = []  # Device values: every batch is dispatched before one transfer reads them all.
    waited = time.perf_counter()
    if getattr(self, "_eval_step", None) is None:  # State set without setup().
      self._compile_eval(self.step)
    eval_step = self._eval_step.result()  # Compiled in the background since setup.
    self.steps.stall_s += time.perf_counter() - waited
    for number in range(self.c.eval.batches):
      batch = input_pipeline.validation_batch(self.val_index, number, self.c.eval.batch_size,
                                              *self.layout.process_rows)
      batch = self.layout.global_batch({"inputs": batch.inputs, "targets": batch.targets},
                                       self.c.eval.batch_size)
      sums.append(eval_step(self.state["params"], batch))
    fetched = sharding.fetch(sums)
    loss = sum(float(s) for s, _ in fetched) / sum(float(n) for _, n in fetched)
    row = {"step": self.step, "tokens": int(self.schedule.tokens_before[self.step]),
           "val_loss": loss, "val_ppl": reporting.perplexity(loss),
           "elapsed_s": time.time() - self.started}
    self.log.eval(row)
    self.last_eval = row
    return row

  def _saved_in_time(self) -> bool:
    """Waits for the started saves; after a stop signal only until
    checkpoint.preemption_timeout_s after it. False: the save was abandoned (its temporary
    directory is never read as a checkpoint; the previous one stays the newest)."""
    if self.stop_signal is None or self.stop_time is None:
      self.checkpoints.wait()
      return True
    return preemption.finished_within(self.checkpoints.wait, self._seconds_left())

  def _on_signal(self, name: str):
    self.stop_signal = name
    self.stop_time = time.monotonic()  # checkpoint.preemption_timeout_s counts from it.
    print(f"{name}: finishing the current step and saving", flush=True)

  def _final_save(self) -> bool:
    """Saves the last step; False when the save was abandoned at the preemption deadline (a
    save still running from before, which orbax would wait for first, counts too). Every
    process takes the same decision: orbax's save begins with a barrier across them."""
    ready = self._saved_in_time() and (self.stop_time is None or self._seconds_left() > 0)
    if not self._everywhere(ready):
      return False
    self.save()
    if not self._everywhere(self._saved_in_time()):
      return False
    self._clear_spent_journal()
    self.checkpoints.close()
    return True

  def _seconds_left(self) -> float:
    return self.stop_time + self.c.checkpoint.preemption_timeout_s - time.monotonic()

  def _finish(self) -> dict:
    completed = self.step >= self.schedule.num_steps
    if completed and getattr(self, "last_eval", {}).get("step") != self.step:
      self.evaluate()
    saved = self._final_save()
    if not saved:
      self.log.info(f"abandoned the save of step {self.step}: not finished "
                    f"checkpoint.preemption_timeout_s={self.c.checkpoint.preemption_timeout_s} s "
                    f"after {self.stop_signal}; the newest complete checkpoint is step "
                    f"{max(self.checkpoints.complete_steps(), default=None)}")
    self.steps.close(wait=self.stop_signal is None)  # A preempted run does not wait on compiles.
    last_eval = getattr(self, "last_eval", {})
    if self.pacer is not None:
      self._check_pacing_agrees()
    summary = {
        "completed": completed, "stopped_by": self.stop_signal, "steps": self.step,
        "total_steps": self.schedule.num_steps,
        "tokens": int(self.schedule.tokens_before[self.step]),
        "wall_time_s": time.time() - self.started, "final_val_loss": last_eval.get("val_loss"),
        "final_val_ppl": last_eval.get("val_ppl"), "compile_stall_s": self.steps.stall_s,
        "compile_stall_after_step0_s": self.steps.stall_s - (self._stall_before_loop or 0.0),
        "buckets": [vars(s) for s in self.steps.stats.values()],
        "other_compile_s": dict(self.steps.other_compile_s),
        "executables_released": self.steps.released,
        "stability": self.monitor.summary(), "save_abandoned": not saved,
        "pacing": (self.pacer.summary() if self.pacer is not None
                   else {"kind": self.c.pacing.kind}),
    }
    if self.primary:
      reporting.write_json(os.path.join(self.workdir, "summary.json"), summary)
      reporting.write_json(os.path.join(self.workdir, "stability.json"), summary["stability"])
    w = self.workdir
    self.log.info(f"{'finished' if completed else 'stopped'} at step {self.step}; waited "
                  f"{self.steps.stall_s:.1f} s on compilation; metrics {w}/metrics.jsonl, "
                  f"TensorBoard {w}/tb, checkpoints {w}/checkpoints, summary {w}/summary.json")
    self.log.close()
    return summary


def padded_batch(batch, seqlen: int) -> dict:
  """A loader batch as the step's inputs/targets, right-padded to the bucket's `seqlen`: the
  padded targets are PAD_TARGET (no loss, not counted), the padded inputs token 0 (causal
  attention never lets a real position see them)."""
  pad = ((0, 0), (0, seqlen - batch.inputs.shape[1]))
  if not pad[1][1]:
    return {"inputs": batch.inputs, "targets": batch.targets}
  return {"inputs": np.pad(batch.inputs, pad),
          "targets": np.pad(batch.targets, pad, constant_values=train_step.PAD_TARGET)}


def train(c, workdir: str) -> dict:
  """Trains a validated config in `workdir` (resuming from its checkpoints); returns the summary."""
  return Trainer(c, workdir).run()
