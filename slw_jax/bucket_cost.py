"""What a run's buckets cost: compile seconds against padded compute, per `compile.pad_multiple`.

Padding a batch of length L to the bucket ceil(L / M) * M trades compiles (fewer buckets) for
compute (the padded positions run through the model and are masked out of the loss). Given a
compile time per bucket and a training rate, `pad_options` prices every M and `recommend`
picks the one with the least compile + padded training time. `compile_stall_s` estimates how
much of the summed compile time the run actually waits for, with compiles in background
threads as the trainer schedules them. Nothing here touches JAX.
"""

from __future__ import annotations

import dataclasses
import heapq

import numpy as np

from slw_jax import pacing

COMPILE_SHARE_TARGET = 0.01  # Compilation above this share of training time: recommend padding.


@dataclasses.dataclass(frozen=True)
class PadOption:
  """The cost of one `compile.pad_multiple` (None: no padding) over a whole run."""
  pad_multiple: int | None
  buckets: int
  compile_s: float  # Summed compile seconds of every bucket.
  train_s: float  # Training seconds at the rate, padded positions included.
  padding_fraction: float  # Share of the run's compute spent on padding.
  stall_s: float = 0.0  # The part of compile_s the run waits for (compile_stall_s).

  @property
  def compile_share(self) -> float:
    return self.compile_s / self.train_s if self.train_s else float("inf")

  @property
  def stall_share(self) -> float:
    return self.stall_s / self.train_s if self.train_s else float("inf")

  @property
  def total_s(self) -> float:
    return self.compile_s + self.train_s


def _step_flops(schedule: pacing.Schedule, lengths, flops_per_token) -> np.ndarray:
  """[S] FLOPs of each step at `lengths` (the compiled lengths: padding included)."""
  per_token = np.array([flops_per_token(int(l)) for l in np.unique(lengths)])
  index = np.searchsorted(np.unique(lengths), lengths)
  return schedule.batch_size * lengths * per_token[index]


def compile_stall_s(buckets: list[pacing.Bucket], step_s: np.ndarray, compile_s: list[float],
                    threads: int, ahead: int) -> float:
  """Seconds a run waits for compiles when they are scheduled as the trainer does.

  Before step 0 the first bucket compiles on a worker beside the largest one (the memory
  check), and the run waits for both. Reaching the first step of bucket i queues the next
  `ahead` buckets (trainer._prefetch_upcoming) for `threads` workers, the first needed first.
  A bucket not ready when first needed stalls the run until it is; one never queued
  (`ahead` 0) compiles then. `buckets` are in order of first use; `step_s` [S] is each step's
  training time; `compile_s[i]` bucket i's compile. Assumes compiles, which run on the host's
  CPU, do not slow the devices, and no rollbacks.
  """
  largest_shape = pacing.largest_bucket(buckets)  # The memory check's bucket, as the trainer's.
  largest = next(i for i, b in enumerate(buckets) if (b.batch_size, b.seqlen) == largest_shape)
  setup = max(compile_s[0], compile_s[largest])
  ready = {0: setup, largest: setup}
  workers = [setup] * threads  # When each compile thread is next free.
  bounds = [b.first_step for b in buckets] + [len(step_s)]
  now = stall = setup
  for i in range(len(buckets)):
    if i not in ready:
      ready[i] = now + compile_s[i]
    stall += max(0.0, ready[i] - now)
    now = max(now, ready[i])
    for j in range(i + 1, min(i + 1 + ahead, len(buckets))):
      if j not in ready:
        ready[j] = max(now, heapq.heappop(workers)) + compile_s[j]
        heapq.heappush(workers, ready[j])
    now += float(np.sum(step_s[bounds[i]:bounds[i + 1]]))
  return stall


@dataclasses.dataclass(frozen=True)
class Costs:
  """What prices a run: `compile_s_of(seqlen)`, one bucket's compile seconds; `flops_per_token(L)`,
  training FLOPs per token at length L; `flops_per_s`, the training rate (all devices); and the
  background compiles (`compile.threads`, and the trainer's look-ahead in buckets)."""
  compile_s_of: object
  flops_per_token: object
  flops_per_s: float
  threads: int = 1
  ahead: int = 2


def pad_option(schedule: pacing.Schedule, pad_multiple: int | None, seqlen_end: int,
               costs: Costs) -> PadOption:
  """The cost of running `schedule` with `pad_multiple`."""
  lengths = np.asarray(pacing.padded_lengths(schedule.seqlen, pad_multiple, seqlen_end))
  buckets = dataclasses.replace(schedule, bucket_seqlen=lengths).buckets()
  padded_flops = _step_flops(schedule, lengths, costs.flops_per_token)
  real_flops = float(np.sum(_step_flops(schedule, schedule.seqlen, costs.flops_per_token)))
  compile_s = [costs.compile_s_of(b.seqlen) for b in buckets]
  step_s = padded_flops / costs.flops_per_s
  return PadOption(pad_multiple, len(buckets), float(sum(compile_s)), float(np.sum(step_s)),
                   1.0 - real_flops / float(np.sum(padded_flops)),
                   compile_stall_s(buckets, step_s, compile_s, costs.threads, costs.ahead))


def pad_options(schedule: pacing.Schedule, multiple: int, seqlen_end: int, costs: Costs,
                also=None) -> list[PadOption]:
  """No padding, then every pad multiple `multiple * 2**k` up to `seqlen_end`, and `also`
  (a configured multiple) if it is not among them."""
  candidates, m = [None], multiple * 2
  while m <= seqlen_end:
    candidates.append(m)
    m *= 2
  if also not in candidates:
    candidates = sorted(candidates[1:] + [also], key=int)
    candidates.insert(0, None)
  return [pad_option(schedule, m, seqlen_end, costs) for m in candidates]


def recommend(options: list[PadOption]) -> PadOption:
  """No padding when its compilation stays within COMPILE_SHARE_TARGET of training time;
  otherwise the option with the least compile + training time."""
  if options[0].compile_share <= COMPILE_SHARE_TARGET:
    return options[0]
  return min(options, key=lambda o: o.total_s)
