"""Pacing: boundaries, DeepSpeed equivalence, rounding, token accounting, buckets."""

import math

import numpy as np
import pytest

from slw_jax import config_lib, errors, pacing


class DeepSpeedCurriculum:
  """An independent transcription of DeepSpeed's stateful `CurriculumScheduler`
  (deepspeed/runtime/data_pipeline/curriculum_scheduler.py): it keeps a current difficulty,
  returns it unchanged once it reaches the maximum, and otherwise computes
  floor(((t / total) ** (1 / degree)) * (max - min) + min), minus that value modulo
  difficulty_step, capped at the maximum; `fixed_discrete` moves to the next difficulty once
  t passes the current one's max_step. Nothing here is shared with slw_jax.pacing."""

  def __init__(self, kind, start, end, total, step, degree=1.0, stages=None):
    self.kind, self.min, self.max, self.current = kind, start, end, start
    self.total, self.step, self.degree = total, step, 1.0 if kind == "linear" else degree
    if kind == "discrete":  # {difficulty: [its max_step, the next difficulty]}
      difficulties = [s for s, _ in stages] + [end]
      self.schedule = {d: [m, difficulties[i + 1]] for i, (d, m) in enumerate(stages)}

  def next_difficulty(self, global_steps):
    if self.current >= self.max:
      return self.current
    if self.kind == "discrete":
      max_step, following = self.schedule[self.current]
      if global_steps > max_step:
        self.current = following
      return self.current
    value = (float(global_steps) / self.total) ** (1.0 / self.degree)
    value = math.floor(value * (self.max - self.min) + self.min)
    value -= value % self.step
    self.current = min(value, self.max)
    return self.current


def deepspeed_difficulties(steps, kind, start, end, total, step, degree=1.0, stages=None):
  """DeepSpeed's difficulty at each of `steps` (ascending), from one scheduler stepped through
  them in order as its engine does."""
  scheduler = DeepSpeedCurriculum(kind, start, end, total, step, degree, stages)
  return [scheduler.next_difficulty(t) for t in steps]


def _pacing(load_config, **overrides):
  overrides.setdefault("pacing__multiple", 8)  # The paper's rounding (tiny.py uses 32 on CPU).
  overrides.setdefault("pacing__seqlen_start", 16)
  return config_lib.validate(load_config("tiny", **overrides))


BOUNDARY_CASES = [
    dict(pacing__kind="linear", pacing__seqlen_start=16, pacing__duration_steps=150),
    dict(pacing__kind="linear", pacing__seqlen_start=12, pacing__duration_steps=7),
    dict(pacing__kind="linear", pacing__seqlen_start=20, pacing__duration_steps=1,
         pacing__multiple=16),
    dict(pacing__kind="linear", pacing__seqlen_start=72, pacing__duration_steps=115,
         pacing__seqlen_end=256),  # gpt3_125m's start, a multiple of 8.
    dict(pacing__kind="linear", pacing__seqlen_start=100, pacing__duration_steps=40,
         pacing__multiple=32),  # Rounds down to 96 at step 0.
    dict(pacing__kind="linear", pacing__seqlen_start=256, pacing__duration_steps=10),
    dict(pacing__kind="root", pacing__seqlen_start=8, pacing__duration_steps=150,
         pacing__root_degree=2.0),
    dict(pacing__kind="root", pacing__seqlen_start=13, pacing__duration_steps=33,
         pacing__root_degree=3.0),
    dict(pacing__kind="root", pacing__seqlen_start=8, pacing__duration_steps=100,
         pacing__root_degree=0.5),
]


@pytest.mark.parametrize("overrides", BOUNDARY_CASES)
def test_linear_and_root_match_deepspeed_everywhere(load_config, overrides):
  c = _pacing(load_config, **overrides)
  p = c.pacing
  total = p.duration_steps
  steps = sorted(set(range(0, 3 * total + 5)) | {0, 1, total - 1, total, total + 1, 10**7})
  ours = pacing.seqlens(p, np.array(steps))
  theirs = deepspeed_difficulties(steps, p.kind, p.seqlen_start, p.seqlen_end, total, p.multiple,
                                  p.root_degree)
  np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("start,multiple,first", [(12, 8, 8), (13, 8, 8), (100, 32, 96),
                                                  (72, 8, 72), (31, 16, 16)])
def test_a_start_off_the_multiple_rounds_down_like_deepspeed(load_config, start, multiple, first):
  p = _pacing(load_config, pacing__seqlen_start=start, pacing__multiple=multiple,
              pacing__duration_steps=50).pacing
  assert pacing.seqlen_at(p, 0) == first
  assert deepspeed_difficulties([0], "linear", start, p.seqlen_end, 50, multiple) == [first]


@pytest.mark.parametrize("start,multiple", [(4, 8), (7, 8), (16, 32)])
def test_a_start_below_the_multiple_is_a_config_error(load_config, start, multiple):
  with pytest.raises(errors.ConfigError, match=rf"config.pacing.seqlen_start={start} is "
                     rf"invalid: must be an integer in \[pacing.multiple={multiple}, "):
    _pacing(load_config, pacing__seqlen_start=start, pacing__multiple=multiple)


@pytest.mark.parametrize("overrides", BOUNDARY_CASES)
def test_boundaries_rounding_and_monotonicity(load_config, overrides):
  p = _pacing(load_config, **overrides).pacing
  total, m = p.duration_steps, p.multiple
  first_multiple = p.seqlen_start - p.seqlen_start % m  # Rounded down, as DeepSpeed does.
  values = pacing.seqlens(p, np.arange(0, 3 * total + 2))
  assert pacing.seqlen_at(p, 0) == min(first_multiple, p.seqlen_end)
  assert pacing.seqlen_at(p, total) == p.seqlen_end
  assert pacing.seqlen_at(p, total + 1) == p.seqlen_end
  assert pacing.seqlen_at(p, 10**9) == p.seqlen_end
  if total > 1 and p.seqlen_start < p.seqlen_end - m:
    assert pacing.seqlen_at(p, total - 1) < p.seqlen_end
  assert np.all(values % m == 0)
  assert np.all(np.diff(values) >= 0)
  assert values.min() >= first_multiple and values.max() <= p.seqlen_end


def test_linear_known_values(load_config):
  # seqlen_t = 16 + 240 * t / 150, floored to a multiple of 8.
  p = _pacing(load_config).pacing
  expected = {0: 16, 1: 16, 5: 24, 74: 128, 75: 136, 149: 248, 150: 256, 151: 256}
  assert {t: pacing.seqlen_at(p, t) for t in expected} == expected


def test_root_grows_faster_than_linear_early(load_config):
  linear = _pacing(load_config, pacing__kind="linear").pacing
  root = _pacing(load_config, pacing__kind="root", pacing__root_degree=2.0).pacing
  steps = np.arange(1, 150)
  assert np.all(pacing.seqlens(root, steps) >= pacing.seqlens(linear, steps))
  assert pacing.seqlen_at(root, 38) == 136  # 16 + 240 * sqrt(38/150) = 136.8 -> 136


def test_discrete_matches_deepspeed_fixed_discrete(load_config):
  stages = ((32, 9), (128, 19))
  p = _pacing(load_config, pacing__kind="discrete", pacing__stages=stages).pacing
  steps = list(range(0, 40))
  ours = pacing.seqlens(p, np.array(steps))
  theirs = deepspeed_difficulties(steps, "discrete", stages[0][0], 256, 0, 8, stages=stages)
  np.testing.assert_array_equal(ours, theirs)
  assert [pacing.seqlen_at(p, t) for t in (0, 9, 10, 19, 20, 10**6)] == [32, 32, 128, 128, 256,
                                                                        256]


def test_shortformer_two_stage(load_config):
  p = _pacing(load_config, pacing__kind="discrete", pacing__stages=((128, 99),)).pacing
  assert pacing.seqlen_at(p, 99) == 128 and pacing.seqlen_at(p, 100) == 256


def test_none_is_always_full_length(load_config):
  p = _pacing(load_config, pacing__kind="none").pacing
  assert set(pacing.seqlens(p, np.arange(0, 1000)).tolist()) == {256}


def test_token_accounting_and_token_stop(load_config):
  c = _pacing(load_config, train_tokens=200_000)
  s = pacing.run_schedule(c)
  manual, consumed = [], 0
  for t in range(s.num_steps):
    manual.append(consumed)
    consumed += pacing.seqlen_at(c.pacing, t) * c.batch_size
  np.testing.assert_array_equal(s.tokens_before[:-1], manual)
  assert s.total_tokens == consumed
  assert s.tokens_before[-2] < 200_000 <= s.total_tokens  # Ends at the first step reaching it.


def test_step_stop_and_first_reached_wins(load_config):
  assert pacing.run_schedule(_pacing(load_config, train_steps=7)).num_steps == 7
  both = pacing.run_schedule(_pacing(load_config, train_steps=10_000, train_tokens=1280,
                                              optim__warmup_steps=0))
  assert both.num_steps == 5  # Steps 0-4 run at seqlen 16: 5 x 16 sequences x 16 = 1280.
  short = pacing.run_schedule(_pacing(load_config, train_steps=3, train_tokens=10**9))
  assert short.num_steps == 3


def test_long_run_chunks_agree_with_direct_evaluation(load_config):
  c = _pacing(load_config, train_tokens=200_000_000)  # Forces several vectorized chunks.
  s = pacing.run_schedule(c)
  np.testing.assert_array_equal(s.seqlen, pacing.seqlens(c.pacing, np.arange(s.num_steps)))
  assert s.tokens_before[-2] < 200_000_000 <= s.total_tokens
  np.testing.assert_array_equal(np.diff(s.tokens_before), s.seqlen * s.batch_size)


def test_buckets_in_order_of_first_use(load_config):
  c = _pacing(load_config)
  s = pacing.run_schedule(c)
  buckets = s.buckets()
  assert [b.seqlen for b in buckets] == list(range(16, 257, 8))
  assert [b.first_step for b in buckets] == sorted(b.first_step for b in buckets)
  assert sum(b.num_steps for b in buckets) == s.num_steps
  for b in buckets:
    assert s.seqlen[b.first_step] == b.seqlen and s.batch_size[b.first_step] == b.batch_size
    assert b.first_step == 0 or s.seqlen[b.first_step - 1] != b.seqlen


def test_batch_warmup_rises_linearly_by_tokens(load_config):
  c = _pacing(load_config, pacing__kind="none", batch_size=64, batch_warmup__start=10,
              batch_warmup__tokens=100_000, batch_warmup__multiple=8, train_tokens=300_000,
              optim__warmup_steps=5)
  assert pacing.batch_size_at(c, 0) == 16  # 10 rounded up to the first multiple of 8.
  assert pacing.batch_size_at(c, 50_000) == 32  # 10 + 54 * 0.5 = 37 -> 32
  assert pacing.batch_size_at(c, 100_000) == 64
  assert pacing.batch_size_at(c, 10**9) == 64
  s = pacing.run_schedule(c)
  assert np.all(s.batch_size % 8 == 0) and np.all(np.diff(s.batch_size) >= 0)
  for t in range(s.num_steps):
    assert s.batch_size[t] == pacing.batch_size_at(c, int(s.tokens_before[t]))
  np.testing.assert_array_equal(np.diff(s.tokens_before), s.seqlen * s.batch_size)
  assert [b.batch_size for b in s.buckets()] == sorted({int(b) for b in s.batch_size})


def test_warmup_end_in_both_units(load_config):
  by_steps = _pacing(load_config, optim__warmup_steps=30)
  end = pacing.warmup_end(by_steps)
  assert end.step == 30
  assert end.tokens == pacing.walk(by_steps, stop_steps=30).total_tokens
  by_tokens = _pacing(load_config, optim__warmup_steps=0, optim__warmup_tokens=10_000)
  end = pacing.warmup_end(by_tokens)
  s = pacing.run_schedule(by_tokens)
  assert end.tokens == 10_000
  assert s.tokens_before[end.step - 1] < 10_000 <= s.tokens_before[end.step]


def test_padded_buckets_round_lengths_up_and_count_real_tokens(load_config):
  c = _pacing(load_config, compile__pad_multiple=64)
  s = pacing.run_schedule(c)
  np.testing.assert_array_equal(s.seqlen, pacing.seqlens(c.pacing, np.arange(s.num_steps)))
  buckets = s.buckets()
  assert [b.seqlen for b in buckets] == [64, 128, 192, 256]  # 16..256 in steps of 8, padded.
  assert sum(b.num_steps for b in buckets) == s.num_steps
  assert sum(b.tokens for b in buckets) == s.total_tokens  # Real tokens only.
  for b in buckets:
    steps = np.arange(b.first_step, b.last_step + 1)
    assert np.all((s.seqlen[steps] <= b.seqlen) & (s.seqlen[steps] > b.seqlen - 64))
    assert s.bucket_shape(b.last_step) == (b.batch_size, b.seqlen)
    assert b.padding_fraction == pytest.approx(
        1 - s.seqlen[steps].sum() / (len(steps) * b.seqlen))
  assert buckets[-1].padding_fraction < 0.02  # Mostly full-length steps after the warmup.
  unpadded = pacing.run_schedule(_pacing(load_config)).buckets()
  assert all(b.padding_fraction == 0 and b.last_step >= b.first_step for b in unpadded)
  assert pacing.padded_lengths(np.array([8, 64, 65, 250]), 64, 250).tolist() == [64, 64, 128, 250]
