"""The study's regimes (presets), its arms and their config overrides.

The regime is the paper's aggressive recipe in ratio (Sec. 5: batch 4K for 37.5K steps after a
3K-step LR warmup, i.e. warmup 8% of the baseline's steps): LR warmup 8% of the baseline's
tokens, cosine decay by tokens to lr / 10, Adam beta2 0.999, clipping 1.0, equal token budget
for every arm, and SLW from 8 tokens (the paper's start) to a context at least 32x longer.
"""

from __future__ import annotations

import math

from slw_jax import config_lib, pacing

ARMS = ("baseline", "slw", "qk_norm", "z_loss", "adaptive", "adaptive_fast",  # At every LR.
        "slw_tuned", "shortformer", "batch_warmup", "slw+qk_norm",  # At 3 of them.
        "adaptive+backoff")
SWEEP_ARMS = ARMS[:6]
QUICK_ARMS = SWEEP_ARMS[:5]  # Without adaptive_fast, the first default kept for the record.
# The arms whose spread picks the seeded LRs (issue 23's): an arm added later (adaptive, issue
# 24) is seeded at the same LRs rather than moving them (which would re-seed every arm).
SEED_LR_ARMS = tuple(a for a in ARMS if not a.startswith("adaptive"))
WARMUP_FRACTION = 0.08  # The paper's aggressive recipe: 3K warmup steps of 37.5K.
SLW_START = 8  # The paper's seqlen_start.
SLW_WARMUPS = 4  # The slw arm's T in LR-warmup lengths ("a few", Sec. 4).
Z_LOSS = 1e-4  # PaLM's coefficient.
NOISE_TARGET = 0.03  # Nats: the seed-to-seed std the study is designed to stay under.
MAX_NOISE_SEEDS = 7  # More seeds per point when the floor is above NOISE_TARGET, up to this
# (the CPU study's time budget).


def _half_decades(low_exponent: float, count: int) -> tuple[float, ...]:
  return tuple(float(f"{10 ** (low_exponent + k / 2):.3g}") for k in range(count))


# name -> (overrides of configs/tiny.py, learning rates, baseline steps). Baseline steps fix
# the token budget: steps * batch_size * max_seqlen.
PRESETS = {
    # 2 blocks of width 64, context 256 (32x SLW's start), 16 x 256 = 4K tokens per step,
    # 150 baseline steps: one run trains in about 30 s on the 2-core CPU VM (NOTES.md).
    # The validation loss is over all 194 windows of the default corpus's validation split.
    "cpu": ({"model.n_layer": 2, "model.d_model": 64, "model.n_head": 2,
             "model.max_seqlen": 256, "batch_size": 16, "eval.batch_size": 97,
             "eval.batches": 2, "eval.every_steps": 25, "compile.pad_multiple": 32,
             "batch_warmup.multiple": 4},
            _half_decades(-3.5, 8), 150),
    # The GPU preset (issue 23 item 6): 6 blocks of width 384, context 1024 (128x SLW's start),
    # 32 x 1024 tokens per step, bf16; sized for about 10 minutes of one H100/H200 (5 arms).
    "gpu": ({"model.n_layer": 6, "model.d_model": 384, "model.n_head": 6,
             "model.max_seqlen": 1024, "model.dtype": "bfloat16", "batch_size": 32,
             "eval.batch_size": 32, "eval.batches": 8, "eval.every_steps": 50,
             "compile.pad_multiple": 128, "batch_warmup.multiple": 4},
            _half_decades(-3.5, 6), 200),
    # The test suite's smoke: a 1-block model, a few steps, 8 simulated devices.
    "smoke": ({"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2,
               "model.max_seqlen": 64, "batch_size": 16, "eval.batch_size": 8,
               "eval.batches": 1, "eval.every_steps": 4, "compile.pad_multiple": 32,
               "batch_warmup.multiple": 8, "data.val_fraction": 0.1,
               "tune.seqlen_starts": (8,), "tune.max_duration_warmups": 2},
              (1e-3, 1e-1, 10.0), 24),
}
COMMON = {"train_steps": None, "pacing.kind": "none", "pacing.multiple": 8,
          "optim.warmup_steps": 0, "optim.b2": 0.999, "optim.clip_norm": 1.0,
          "checkpoint.every_steps": 50, "log.print_every_steps": 50}


def regime_overrides(preset: str) -> dict:
  """The baseline's overrides of configs/tiny.py (at the sweep's first learning rate)."""
  overrides, lrs, steps = PRESETS[preset]
  tokens = steps * overrides["batch_size"] * overrides["model.max_seqlen"]
  warmup = int(WARMUP_FRACTION * tokens)
  # The tuner's windows are multiples of the LR warmup, which is 8% of a short run here: its
  # smallest useful search (2 starts, T from 1 to 4 warmups, one bisection) costs a large share
  # of one run, reported beside the result.
  tuner = {"tune.seqlen_starts": (8, 32), "tune.first_duration_warmups": 1,
           "tune.max_duration_warmups": 4, "tune.start_window_warmups": 1.0,
           "tune.window_warmups": 1.0, "tune.search_trials": 1,
           "tune.evals_per_warmup": 2, "tune.eval_batches": 1,
           "tune.max_cost_fraction": 1.0}
  return {**COMMON, **tuner, **overrides, "train_tokens": tokens,
          "optim.warmup_tokens": warmup, "optim.lr": lrs[0], "optim.min_lr": lrs[0] / 10}


def slw_steps(c) -> int:
  """The slw arm's T: SLW_WARMUPS LR warmups, counted in baseline steps."""
  per_step = c.batch_size * c.model.max_seqlen
  return max(1, SLW_WARMUPS * math.ceil(c.optim.warmup_tokens / per_step))


def arm_overrides(c, arm: str, lr: float, tuned: tuple[int, int] | None = None) -> dict:
  """The overrides of the baseline config `c` that make `arm` at learning rate `lr`."""
  at_lr = {"optim.lr": lr, "optim.min_lr": lr / 10}
  if arm == "baseline":
    return at_lr
  if arm == "slw":
    return {**at_lr, "pacing.kind": "linear", "pacing.seqlen_start": SLW_START,
            "pacing.duration_steps": slw_steps(c)}
  if arm == "qk_norm":
    return {**at_lr, "model.qk_norm": True}
  if arm == "adaptive":  # Its defaults (config_lib.base_config): no per-run tuning.
    return {**at_lr, "pacing.kind": "adaptive", "pacing.seqlen_start": SLW_START}
  if arm == "adaptive_fast":  # The first default, a decision every 10 steps (NOTES.md).
    return {**arm_overrides(c, "adaptive", lr), "pacing.adaptive.every_steps": 10}
  if arm == "adaptive+backoff":  # Whether pacing.adaptive.backoff should be on by default.
    return {**arm_overrides(c, "adaptive", lr), "pacing.adaptive.backoff": True}
  if arm == "z_loss":
    return {**at_lr, "optim.z_loss": Z_LOSS}
  if arm == "slw+qk_norm":
    return {**arm_overrides(c, "slw", lr), "model.qk_norm": True}
  if arm == "slw_tuned":
    return {**at_lr, "pacing.kind": "linear", "pacing.seqlen_start": tuned[0],
            "pacing.duration_steps": tuned[1]}
  if arm == "shortformer":  # Paper 5.1: seqlen_end / 8 for about half the baseline's steps.
    end, multiple = c.model.max_seqlen, c.pacing.multiple
    stage = max(multiple, end // 8 - (end // 8) % multiple)
    half = pacing.run_schedule(c).num_steps // 2
    return {**at_lr, "pacing.kind": "discrete", "pacing.stages": ((stage, half - 1),)}
  if arm == "batch_warmup":  # Paper 5.1: batch / 32 rising over SLW's warmup tokens.
    slw = config_lib.with_overrides(c, arm_overrides(c, "slw", lr))
    tokens = int(pacing.walk(slw, stop_steps=slw_steps(c)).total_tokens)
    start = max(c.batch_warmup.multiple, c.batch_size // 32)
    return {**at_lr, "batch_warmup.start": start, "batch_warmup.tokens": tokens}
  raise ValueError(f"unknown arm {arm!r}")  # A bug: parse_args checked the names.


def mechanism_overrides(c, seqlen: int, lr: float) -> dict:
  """The mechanism probe: the first 2 LR warmups at one fixed `seqlen`, with the baseline's
  tokens per step (batch_size * max_seqlen / seqlen sequences), so only the length differs."""
  per_step = c.batch_size * c.model.max_seqlen
  steps = 2 * math.ceil(c.optim.warmup_tokens / per_step)
  fixed = ({"pacing.kind": "discrete", "pacing.stages": ((seqlen, steps),)}
           if seqlen < c.model.max_seqlen else {})
  return {"optim.lr": lr, "optim.min_lr": lr / 10, "batch_size": per_step // seqlen,
          "train_tokens": None, "train_steps": steps, "eval.every_steps": 10**6,
          "eval.batch_size": c.eval.batch_size, **fixed}
