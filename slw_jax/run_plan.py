"""What the run trains at each step, and which compiled steps it needs: `RunPlan`.

The plan holds the run's `pacing.Schedule` (each step's length and batch size), the learning
rate of each step, and, under adaptive pacing, the controller (slw_jax.adaptive) whose length
changes redraw both. It also answers which buckets to compile next and which to release:

- Fixed pacing knows every step's bucket in advance: the next `compile.ahead` buckets (at least
  `compile.threads`, unless ahead is 0) compile in the background, each at the priority of its
  first step, and a bucket's executable is released two steps after its last one (the step
  before may still be running on the device).
- Adaptive pacing decides lengths online: the current bucket and the next rung's (the first
  step a growth can reach) compile ahead; shorter buckets than the current and previous steps'
  are released, except the previous rung's while a backoff can come (`pacing.adaptive.backoff`).

Nothing here touches JAX: the trainer hands the answers to `compiled_steps.BucketedStep`.
"""

from __future__ import annotations

import bisect

from slw_jax import adaptive, config_diff, optim, pacing

Shape = tuple[int, int]  # (batch_size, seqlen) of a bucket.


class RunPlan:
  """The schedule, LRs and bucket plan of one run of validated config `c`. Before any adaptive
  decision the schedule is the slowest one, so checks made on it cover every run."""

  def __init__(self, c):
    self.c = c
    self.pacer = adaptive.Controller(c) if c.pacing.kind == "adaptive" else None
    self.schedule = pacing.run_schedule(c)
    self.lrs = optim.learning_rates(c, self.schedule)
    self.buckets = self.schedule.buckets()  # Of the first schedule (np.unique over every step).
    self._first_steps = [b.first_step for b in self.buckets]  # Ascending: order of first use.
    self._release_after = {}  # Step -> buckets whose last step it is (released 2 steps on).
    for b in self.buckets:
      self._release_after.setdefault(b.last_step, []).append((b.batch_size, b.seqlen))

  def batch_sizes(self) -> dict[str, int]:
    """Every batch size the run uses, named as the config sets it (for the mesh's check)."""
    sizes = {"config.batch_size": self.c.batch_size,
             "config.eval.batch_size": self.c.eval.batch_size}
    for b in self.buckets:
      sizes.setdefault(f"the batch size at step {b.first_step} (config.batch_warmup.start and "
                       ".multiple)", b.batch_size)
    return sizes

  # ----- adaptive pacing ---------------------------------------------------------------------

  def replan(self):
    """The run redrawn from the controller's changes (lengths, LRs, steps)."""
    self.schedule = pacing.run_schedule(self.c, self.pacer.changes)
    self.lrs = optim.learning_rates(self.c, self.schedule)

  def observe(self, step: int, row: dict) -> tuple[dict | None, bool]:
    """The controller's decision on step `step`'s metrics (an event, or None) and whether the
    lengths changed (the plan is then redrawn)."""
    changes = len(self.pacer.changes)
    decision = self.pacer.observe(step, row)
    changed = len(self.pacer.changes) != changes
    if changed:
      self.replan()
    return decision, changed

  def restore(self, meta: dict, step: int) -> str | None:
    """The controller's state from a checkpoint's record at `step`, and the plan redrawn from
    it; a fixed schedule's checkpoint continues from the length it had reached (returns the
    line that says so)."""
    state, note = meta.get("pacing"), None
    if state is None:
      saved = config_diff.on_one_device(meta["config"])
      state = self.pacer.state_after_fixed(pacing.run_schedule(saved), step)
      note = (f"the checkpoint of step {step} has a fixed schedule (pacing.kind="
              f"{saved.pacing.kind!r}): adaptive pacing continues from seqlen "
              f"{state['changes'][-1][1]}")
    self.pacer.load_state(state)
    self.replan()
    return note

  def agreement(self, digests: list[int]) -> str | None:
    """Checks that every process took the same length changes (their `digests`, in process
    order): they read the same global metrics, so a difference is a bug, raised as one (it
    would also have desynchronized the steps). Returns the line saying so, with several."""
    if len(set(digests)) != 1:
      raise RuntimeError(f"adaptive pacing decided differently on the processes (digests "
                         f"{digests}; this one's changes: {self.pacer.changes})")
    if len(digests) > 1:
      return (f"adaptive pacing: the {len(digests)} processes took the same "
              f"{len(self.pacer.changes) - 1} length change(s)")
    return None

  def checkpoint_meta(self) -> dict:
    """What every checkpoint records of the pacing: the controller's state."""
    return {} if self.pacer is None else {"pacing": self.pacer.state()}

  def summary(self) -> dict:
    return self.pacer.summary() if self.pacer is not None else {"kind": self.c.pacing.kind}

  # ----- compiled buckets --------------------------------------------------------------------

  def to_compile(self, step: int) -> list[tuple[Shape, int]]:
    """(bucket, priority) pairs to queue before launching `step` (queuing one already compiled
    or queued is a no-op); a lower priority compiles first."""
    if self.pacer is not None:
      batch_size, seqlen = self.schedule.bucket_shape(step)
      queued = [((batch_size, seqlen), step)]
      if self.c.compile.ahead:
        growth = (batch_size, self.bucket_of(self.pacer.next_rung(seqlen)))
        queued.append((growth, step + self.c.pacing.adaptive.every_steps))
      return queued
    ahead = self.c.compile.ahead and max(self.c.compile.ahead, self.c.compile.threads)
    start = bisect.bisect_right(self._first_steps, step)
    return [((b.batch_size, b.seqlen), b.first_step) for b in self.buckets[start:start + ahead]]

  def to_release(self, step: int, live: list[Shape]) -> list[Shape]:
    """Buckets whose executables can go before launching `step`. Fixed pacing: those whose
    last step is `step - 2` (earlier ones went at their own turn, or were never compiled by
    this process: a resumed run). Adaptive: those of the `live` ones shorter than the buckets
    of `step` and `step - 1`, and than the previous rung's while a backoff can come."""
    if self.pacer is None:
      return self._release_after.get(step - 2, [])
    keep = min(int(self.schedule.compiled_seqlen[k]) for k in (max(step - 1, 0), step))
    if self.c.pacing.adaptive.backoff:
      keep = min(keep, self.bucket_of(self.pacer.previous_rung(keep)))
    return [shape for shape in live if shape[1] < keep]

  def bucket_of(self, seqlen: int) -> int:
    """The compiled length of a step of `seqlen` tokens (compile.pad_multiple)."""
    return int(pacing.padded_lengths(seqlen, self.c.compile.pad_multiple,
                                     self.c.pacing.seqlen_end))
