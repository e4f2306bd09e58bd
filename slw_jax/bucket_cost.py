"""What a run's buckets cost: compile seconds against padded compute, per `compile.pad_multiple`.

Padding a batch of length L to the bucket ceil(L / M) * M trades compiles (fewer buckets) for
compute (the padded positions run through the model and are masked out of the loss). Given a
compile time per bucket and a training rate, `pad_options` prices every M and `recommend`
picks the one with the least compile + padded training time. Nothing here touches JAX.
"""

from __future__ import annotations

import dataclasses

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

  @property
  def compile_share(self) -> float:
    return self.compile_s / self.train_s if self.train_s else float("inf")

  @property
  def total_s(self) -> float:
    return self.compile_s + self.train_s


def _step_flops(schedule: pacing.Schedule, lengths, flops_per_token) -> float:
  """FLOPs of every step at `lengths` (the compiled lengths: padding included)."""
  per_token = np.array([flops_per_token(int(l)) for l in np.unique(lengths)])
  index = np.searchsorted(np.unique(lengths), lengths)
  return float(np.sum(schedule.batch_size * lengths * per_token[index]))


def pad_option(schedule: pacing.Schedule, pad_multiple: int | None, seqlen_end: int,
               compile_s_of, flops_per_token, flops_per_s: float) -> PadOption:
  """The cost of running `schedule` with `pad_multiple`.

  `compile_s_of(seqlen)`: compile seconds of one bucket of that length; `flops_per_token(L)`:
  training FLOPs per token at length L; `flops_per_s`: the training rate (all devices).
  """
  lengths = np.asarray(pacing.padded_lengths(schedule.seqlen, pad_multiple, seqlen_end))
  padded = dataclasses.replace(schedule, bucket_seqlen=lengths)
  buckets = padded.buckets()
  padded_flops = _step_flops(schedule, lengths, flops_per_token)
  real_flops = _step_flops(schedule, schedule.seqlen, flops_per_token)
  return PadOption(pad_multiple, len(buckets), float(sum(compile_s_of(b.seqlen) for b in buckets)),
                   padded_flops / flops_per_s, 1.0 - real_flops / padded_flops)


def pad_options(schedule: pacing.Schedule, multiple: int, seqlen_end: int, compile_s_of,
                flops_per_token, flops_per_s: float, also=None) -> list[PadOption]:
  """No padding, then every pad multiple `multiple * 2**k` up to `seqlen_end`, and `also`
  (a configured multiple) if it is not among them."""
  candidates, m = [None], multiple * 2
  while m <= seqlen_end:
    candidates.append(m)
    m *= 2
  if also not in candidates:
    candidates = sorted(candidates[1:] + [also], key=int)
    candidates.insert(0, None)
  return [pad_option(schedule, m, seqlen_end, compile_s_of, flops_per_token, flops_per_s)
          for m in candidates]


def recommend(options: list[PadOption]) -> PadOption:
  """No padding when its compilation stays within COMPILE_SHARE_TARGET of training time;
  otherwise the option with the least compile + training time."""
  if options[0].compile_share <= COMPILE_SHARE_TARGET:
    return options[0]
  return min(options, key=lambda o: o.total_s)
