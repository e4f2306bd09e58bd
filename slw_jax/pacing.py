"""Sequence-length and batch-size schedules, token accounting and the bucket list.

Step convention: step `t` is the t-th optimizer update, counted from 0. The sequence length of
step t is the pacing formula evaluated at t, so step 0 trains at `seqlen_start` rounded down to
a multiple of `pacing.multiple` (DeepSpeed rounds every length down, the first one included;
a start below the multiple would round to 0 and is a config error). As a function,
`seqlens(p, t)` equals DeepSpeed's `CurriculumScheduler.get_difficulty(t)` for the
`fixed_linear` / `fixed_root` / `fixed_discrete` schedules with the same parameters
(`min_difficulty=seqlen_start`, `max_difficulty=seqlen_end`, `total_curriculum_step=T`,
`difficulty_step=multiple`). DeepSpeed's engine calls it with `global_steps + 1`, so its k-th
update uses our value for step k + 1: a DeepSpeed run is one step ahead of ours.

Token accounting: tokens consumed before step t = sum over i < t of batch_size_i * seqlen_i.
Training ends at the first step whose tokens-before reaches `train_tokens`, or after
`train_steps` steps, whichever comes first. Nothing here touches JAX.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np

from slw_jax.errors import ConfigError

# Plans longer than this are almost certainly a units mistake (and would need GBs of arrays).
MAX_PLAN_STEPS = 20_000_000


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def seqlens(p, steps) -> np.ndarray:
  """Sequence length of each step in `steps` (int array) under pacing config `p`."""
  steps = np.asarray(steps, dtype=np.int64)
  end = p.seqlen_end
  if p.kind == "adaptive":  # A bug: callers walk it with walk_changes.
    raise ValueError("adaptive pacing decides lengths online: they are not a function of step")
  if p.kind == "none":
    return np.full(steps.shape, end, dtype=np.int64)
  if p.kind == "discrete":
    lengths = np.array([s for s, _ in p.stages] + [end], dtype=np.int64)
    last_steps = np.array([last for _, last in p.stages], dtype=np.int64)
    return lengths[np.searchsorted(last_steps, steps, side="left")]
  start, multiple = p.seqlen_start, p.multiple  # config_lib: start >= multiple.
  # Same float64 operations, in the same order, as DeepSpeed's fixed_root (linear = degree 1).
  degree = 1.0 if p.kind == "linear" else float(p.root_degree)
  fraction = np.minimum((steps.astype(np.float64) / p.duration_steps) ** (1.0 / degree), 1.0)
  lengths = np.floor(fraction * (end - start) + start).astype(np.int64)
  lengths -= lengths % multiple  # Down, as DeepSpeed does: step 0 runs start - start % multiple.
  return np.minimum(lengths, end)


def seqlen_at(p, step: int) -> int:
  """Sequence length of one step."""
  return int(seqlens(p, np.array([step]))[0])


def batch_size_at(c, tokens_before: int) -> int:
  """GPT-3-style batch-size warmup: rises linearly with tokens consumed, then `batch_size`."""
  b = c.batch_warmup
  if b.start == 0:
    return c.batch_size
  fraction = min(tokens_before / b.tokens, 1.0)
  size = int(b.start + (c.batch_size - b.start) * fraction)
  size -= size % b.multiple
  return min(max(size, _round_up(b.start, b.multiple)), c.batch_size)


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One distinct step shape: every step with it runs the same compiled executable.

  `seqlen` is the compiled length; with `compile.pad_multiple` some of its steps train on
  shorter sequences, right-padded to it (`tokens` counts only the real ones)."""
  seqlen: int
  batch_size: int
  first_step: int
  num_steps: int
  last_step: int = -1
  tokens: int = 0  # Real tokens trained on in this bucket's steps.

  @property
  def padding_fraction(self) -> float:
    """The share of this bucket's token positions that are padding."""
    return 1.0 - self.tokens / (self.num_steps * self.batch_size * self.seqlen)


def padded_lengths(seqlen, pad_multiple: int, seqlen_end: int):
  """The bucket length each sequence length runs in: rounded up to `pad_multiple`, at most
  `seqlen_end` (`pad_multiple` 0: every length is its own bucket)."""
  if not pad_multiple:
    return seqlen
  return np.minimum(-(-np.asarray(seqlen) // pad_multiple) * pad_multiple, seqlen_end)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-step shapes of a whole run. Arrays are int64 and indexed by step."""
  seqlen: np.ndarray  # [S]: the length step t trains on (real tokens).
  batch_size: np.ndarray  # [S]
  tokens_before: np.ndarray  # [S + 1]: tokens consumed before step t; the last entry is the total.
  bucket_seqlen: np.ndarray | None = None  # [S]: the compiled length (padded); None: seqlen.

  @property
  def num_steps(self) -> int:
    return len(self.seqlen)

  @property
  def total_tokens(self) -> int:
    return int(self.tokens_before[-1])

  def shape(self, step: int) -> tuple[int, int]:
    """(batch_size, seqlen) that step `step` trains on."""
    return int(self.batch_size[step]), int(self.seqlen[step])

  @property
  def compiled_seqlen(self) -> np.ndarray:
    """[S]: the length each step's executable was compiled for (padded, or its own)."""
    return self.seqlen if self.bucket_seqlen is None else self.bucket_seqlen

  def bucket_shape(self, step: int) -> tuple[int, int]:
    """(batch_size, seqlen) of the executable that runs step `step`."""
    return int(self.batch_size[step]), int(self.compiled_seqlen[step])

  def buckets(self) -> list[Bucket]:
    """Every distinct compiled (seqlen, batch_size) of the run, in order of first use."""
    if self.num_steps == 0:
      return []
    lengths = self.compiled_seqlen
    keys = lengths * (int(self.batch_size.max()) + 1) + self.batch_size
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                          return_counts=True)
    last = np.zeros(len(first), np.int64)
    np.maximum.at(last, inverse, np.arange(self.num_steps))
    tokens = np.bincount(inverse, weights=self.seqlen * self.batch_size)
    return [Bucket(int(lengths[first[i]]), int(self.batch_size[first[i]]), int(first[i]),
                   int(counts[i]), int(last[i]), int(tokens[i])) for i in np.argsort(first)]


def largest_bucket(buckets: list[Bucket]) -> tuple[int, int]:
  """(batch_size, seqlen) of the bucket with the most tokens per step (memory is checked on it)."""
  largest = max(buckets, key=lambda b: b.batch_size * b.seqlen)
  return largest.batch_size, largest.seqlen


def _stop_index(tokens_before: np.ndarray, stop_tokens) -> int | None:
  """First index whose tokens-before reaches `stop_tokens`, or None."""
  if stop_tokens is None:
    return None
  hits = np.nonzero(tokens_before >= stop_tokens)[0]
  return int(hits[0]) if len(hits) else None


def _walk_constant_batch(c, stop_tokens, stop_steps) -> Schedule:
  """Vectorized walk in growing chunks (the batch size does not depend on tokens)."""
  chunks, consumed, first, size = [], 0, 0, 4096
  while True:
    count = size if stop_steps is None else min(size, stop_steps - first)
    lengths = seqlens(c.pacing, np.arange(first, first + count))
    before = consumed + np.concatenate([[0], np.cumsum(lengths * c.batch_size)])
    stop = _stop_index(before, stop_tokens)
    if stop is not None or first + count == stop_steps:
      n = count if stop is None else stop
      chunks.append(lengths[:n])
      break
    chunks.append(lengths)
    consumed, first, size = int(before[-1]), first + count, min(size * 2, 1 << 20)
    if first > MAX_PLAN_STEPS:
      too_long(c, first)
  lengths = np.concatenate(chunks)
  return make_schedule(lengths, np.full_like(lengths, c.batch_size))


def _walk_batch_warmup(c, stop_tokens, stop_steps) -> Schedule:
  """Step-by-step walk: the batch size depends on the tokens consumed so far."""
  lengths, batches, consumed, step = [], [], 0, 0
  while (stop_tokens is None or consumed < stop_tokens) and step != stop_steps:
    if step > MAX_PLAN_STEPS:
      too_long(c, step)
    seqlen, batch = seqlen_at(c.pacing, step), batch_size_at(c, consumed)
    lengths.append(seqlen)
    batches.append(batch)
    consumed += seqlen * batch
    step += 1
  return make_schedule(np.array(lengths, np.int64), np.array(batches, np.int64))


def make_schedule(lengths: np.ndarray, batches: np.ndarray) -> Schedule:
  before = np.concatenate([[0], np.cumsum(lengths * batches)]).astype(np.int64)
  return Schedule(lengths.astype(np.int64), batches.astype(np.int64), before)


def too_long(c, steps: int):
  raise ConfigError(f"config.train_tokens={c.train_tokens!r} is invalid: the run would exceed "
                    f"{MAX_PLAN_STEPS} steps (at {steps} steps so far); lower it or set "
                    "train_steps")


def walk(c, stop_tokens=None, stop_steps=None) -> Schedule:
  """Schedule of the steps run until `stop_tokens` consumed or `stop_steps` taken (adaptive
  pacing: the slowest one, the deadline's floor, as before any decision)."""
  if c.pacing.kind == "adaptive":
    return walk_changes(c, initial_changes(c), stop_tokens, stop_steps)
  if c.batch_warmup.start:
    return _walk_batch_warmup(c, stop_tokens, stop_steps)
  return _walk_constant_batch(c, stop_tokens, stop_steps)


def run_schedule(c, changes=None) -> Schedule:
  """The whole run of a validated config, with its buckets' padded lengths. Adaptive pacing:
  the run of the controller's `changes` so far (default: none yet), projected unchanged."""
  if changes is None:
    schedule = walk(c, c.train_tokens, c.train_steps)
  else:
    schedule = walk_changes(c, changes, c.train_tokens, c.train_steps)
  padded = padded_lengths(schedule.seqlen, c.compile.pad_multiple, c.pacing.seqlen_end)
  return dataclasses.replace(schedule, bucket_seqlen=np.asarray(padded, np.int64))


@dataclasses.dataclass(frozen=True)
class WarmupEnd:
  """Where LR warmup ends, in both units (decay starts from here)."""
  step: int
  tokens: int


def warmup_end(c) -> WarmupEnd:
  """The first step after LR warmup and the tokens consumed before it."""
  o = c.optim
  if o.warmup_steps:
    return WarmupEnd(o.warmup_steps, walk(c, stop_steps=o.warmup_steps).total_tokens)
  if o.warmup_tokens:
    return WarmupEnd(walk(c, stop_tokens=o.warmup_tokens).num_steps, o.warmup_tokens)
  return WarmupEnd(0, 0)


def check_warmup_fits_decay(c):
  """Raises ConfigError when the cosine decay would end before LR warmup does."""
  o = c.optim
  if o.decay_tokens is not None and o.warmup_steps:
    end = warmup_end(c)
    if c.pacing.kind == "adaptive":  # The most tokens by then: a run that grows every time.
      fastest = walk_changes(c, fastest_changes(c), stop_steps=o.warmup_steps)
      end = WarmupEnd(o.warmup_steps, fastest.total_tokens)
    if o.decay_tokens <= end.tokens:
      raise ConfigError(
          f"config.optim.decay_tokens={o.decay_tokens!r} is invalid: must be > the "
          f"{end.tokens} tokens consumed by the end of optim.warmup_steps={o.warmup_steps}")
  if o.decay_steps is not None and o.warmup_tokens:
    end = warmup_end(c)
    if o.decay_steps <= end.step:
      raise ConfigError(
          f"config.optim.decay_steps={o.decay_steps!r} is invalid: must be > the {end.step} "
          f"steps it takes to consume optim.warmup_tokens={o.warmup_tokens}")


# ----- adaptive pacing (pacing.kind=adaptive): the run of a change list ----------------------

def ladder(c) -> list[int]:
  """The lengths an adaptive run can take, ascending: its start (rounded down to
  pacing.multiple), then every rung of pacing.multiple (compile.pad_multiple when set: each rung
  is then a whole bucket, no padding) above it, and seqlen_end."""
  p = c.pacing
  start = p.seqlen_start - p.seqlen_start % p.multiple
  rung = c.compile.pad_multiple or p.multiple
  lengths = [start] + list(range((start // rung + 1) * rung, p.seqlen_end + 1, rung))
  if lengths[-1] != p.seqlen_end:
    lengths.append(p.seqlen_end)
  return lengths


class Deadline:
  """The floor of every step's length: a linear ramp to seqlen_end by the deadline."""

  def __init__(self, c):
    fraction = c.pacing.adaptive.deadline_fraction
    # Each stop the run has, scaled: whichever ends the run first, the ramp ends by its share.
    self.token_span = c.train_tokens and fraction * c.train_tokens
    self.step_span = c.train_steps and fraction * c.train_steps
    self.rungs = ladder(c)  # A list: bisect on it is ~10x np.searchsorted on one value.
    self.start, self.end = self.rungs[0], self.rungs[-1]

  def floor(self, step: int, tokens_before: int) -> int:
    """The shortest length step `step` may take after `tokens_before` tokens (a rung)."""
    progress = max(tokens_before / self.token_span if self.token_span else 0.0,
                   step / self.step_span if self.step_span else 0.0)
    progress = min(1.0, progress)
    target = self.start + (self.end - self.start) * progress
    return self.rungs[bisect.bisect_right(self.rungs, target) - 1]


def initial_changes(c) -> list[list[int]]:
  return [[0, ladder(c)[0]]]


def fastest_changes(c) -> list[list[int]]:
  """The change list of a run quiet at every decision: one rung per decision."""
  every = c.pacing.adaptive.every_steps
  return initial_changes(c) + [[k * every + 1, rung] for k, rung in enumerate(ladder(c)) if k]


def walk_changes(c, changes, stop_tokens=None, stop_steps=None) -> Schedule:
  """The schedule of `changes` (with the deadline's floor) until `stop_tokens` consumed or
  `stop_steps` taken; after the last change, nothing changes but the floor. Walked in runs of
  steps whose shape cannot change (`_steady_steps`): a GPT-2-sized run's ramp is 10^5 steps,
  and the trainer walks again after every change."""
  deadline, end = Deadline(c), c.pacing.seqlen_end
  runs, consumed, step, k = [], 0, 0, 0  # runs: (seqlen, batch_size, steps).
  while (stop_tokens is None or consumed < stop_tokens) and step != stop_steps:
    while k + 1 < len(changes) and changes[k + 1][0] <= step:
      k += 1
    seqlen = max(changes[k][1], deadline.floor(step, consumed))
    batch = batch_size_at(c, consumed)
    last_change = k + 1 == len(changes)
    if seqlen == end and batch == c.batch_size and last_change:
      break  # Constant from here on: the tail below.
    next_change = None if last_change else changes[k + 1][0]
    count = _steady_steps(c, deadline, seqlen, batch, step, consumed, next_change, stop_tokens,
                          stop_steps)
    runs.append((seqlen, batch, count))
    consumed += seqlen * batch * count
    step += count
    if step > MAX_PLAN_STEPS:
      too_long(c, step)
  runs.append((end, c.batch_size, _constant_tail(c.batch_size * end, consumed, step, stop_tokens,
                                                 stop_steps)))
  counts = [n for _, _, n in runs]
  return make_schedule(np.repeat(np.array([r[0] for r in runs], np.int64), counts),
                       np.repeat(np.array([r[1] for r in runs], np.int64), counts))


def _steady_steps(c, deadline: Deadline, seqlen: int, batch: int, step: int, consumed: int,
                  next_change, stop_tokens, stop_steps) -> int:
  """How many steps from `step` surely keep this (seqlen, batch): none of them reaches the next
  change, the floor's next rung, the stop, or a new batch size. A lower bound (1 near an
  edge, where the caller's step-by-step rule decides), never an overshoot."""
  if c.batch_warmup.start and consumed < c.batch_warmup.tokens:
    return 1  # The batch size moves with every step's tokens.
  per_step = seqlen * batch
  bounds = [_constant_tail(per_step, consumed, step, stop_tokens, stop_steps)]
  if next_change is not None:
    bounds.append(next_change - step)
  if seqlen < deadline.end:  # The floor stays below the next rung while progress is below this.
    rung = deadline.rungs[bisect.bisect_right(deadline.rungs, seqlen)]
    progress = (rung - deadline.start) / (deadline.end - deadline.start)
    if deadline.token_span:  # The margin of 1 step keeps float rounding on the safe side.
      bounds.append(math.floor((progress * deadline.token_span - consumed) / per_step) - 1)
    if deadline.step_span:
      bounds.append(math.floor(progress * deadline.step_span - step) - 1)
  return max(1, min(bounds))


def _constant_tail(per_step: int, consumed: int, step: int, stop_tokens, stop_steps) -> int:
  """Steps of `per_step` tokens from (`step`, `consumed`) to the first stop reached."""
  counts = []
  if stop_tokens is not None:
    counts.append(max(0, -(-(stop_tokens - consumed) // per_step)))
  if stop_steps is not None:
    counts.append(max(0, stop_steps - step))
  return min(counts)


def check_deadline(c):
  """Raises ConfigError when the deadline is past the run (the slowest schedule never reaches
  seqlen_end) or leaves no decision to take (it reaches it by the first decision)."""
  every, fraction = c.pacing.adaptive.every_steps, c.pacing.adaptive.deadline_fraction
  slowest = walk_changes(c, initial_changes(c), c.train_tokens, c.train_steps)
  reached = np.nonzero(slowest.seqlen >= c.pacing.seqlen_end)[0]
  if not len(reached):
    raise ConfigError(
        f"config.pacing.adaptive.deadline_fraction={fraction!r} is invalid: the deadline's ramp "
        f"does not reach seqlen_end={c.pacing.seqlen_end} within the run's "
        f"{slowest.num_steps} steps (its last steps are {int(slowest.seqlen[-1])} long); "
        "lower it")
  if reached[0] <= every + 1:
    raise ConfigError(
        f"config.pacing.adaptive.deadline_fraction={fraction!r} is invalid: it reaches "
        f"seqlen_end={c.pacing.seqlen_end} at step {reached[0]}, before the first decision "
        f"applies (step {every + 1}, pacing.adaptive.every_steps={every}); raise it (below 1) "
        "or lower every_steps")
