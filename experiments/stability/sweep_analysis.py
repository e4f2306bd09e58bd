"""The study's statistics, computed from per-run records only (no JAX, no training).

LR sensitivity follows Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer
training instabilities"): the mean over the sweep of min(final loss, loss at initialization)
minus the best final loss of the sweep. A diverged run counts at its loss at initialization.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from slw_jax import report

import sweep_regime as regime  # pylint: disable=g-bad-import-order  (beside this file)

UNSTABLE_RATIO = 1.2  # Table 1's bar: a step whose loss ratio exceeds it is unstable.
NEAR_INIT = 0.9  # A run that ends above 90% of its initial loss learned (almost) nothing.


@dataclasses.dataclass
class Point:
  """One run's numbers."""
  arm: str
  lr: float
  seed: int
  final: float | None  # Final validation loss; None when diverged or not finite.
  init: float  # Training loss of step 0 (the initialized model).
  diverged: bool
  above: int  # Steps with loss ratio above UNSTABLE_RATIO.
  max_ratio: float
  r_l1: float | None  # Table 3: Pearson r of the loss ratio with Adam's variance l1 / max.
  r_max: float | None
  steps: int
  tokens: int
  train_s: float  # Summed step time without compile stalls (steady_time).
  flops: float

  @property
  def capped(self) -> float:
    """min(final, init): what LR sensitivity averages."""
    return self.init if self.final is None else min(self.final, self.init)

  @property
  def stable(self) -> bool:
    """Neither diverged nor ended within 10% of its initial loss."""
    return self.final is not None and self.final < NEAR_INIT * self.init


def point(record, init: float | None = None) -> Point:
  """`init`: the loss at initialization (default: this run's first training loss)."""
  run = record.run()
  stats = report.stability(run, UNSTABLE_RATIO)
  final = record.outcome.get("final_val_loss")
  finite = final is not None and math.isfinite(final) and not record.outcome.get("diverged")
  last = run.steps[-1]
  return Point(record.arm, record.lr, record.seed, final if finite else None,
               float(run.steps[0]["loss"]) if init is None else init,
               bool(record.outcome.get("diverged")),
               stats["unstable_steps"], stats["max_loss_ratio"],
               stats["pearson_loss_ratio_vs_adam_nu_l1"]["r"],
               stats["pearson_loss_ratio_vs_adam_nu_max"]["r"], len(run.steps),
               int(last["tokens"] + last["seqlen"] * last["batch_size"]),
               steady_time(run.steps), float(last["flops"]))


def steady_time(steps) -> float:
  """Summed step time without compile stalls: each bucket's (seqlen, batch) median step time
  times its steps. A step that waited for its bucket to compile is an outlier the median
  drops, so arms with many buckets (SLW, the warmups) are not charged for compiling."""
  buckets = {}
  for row in steps:
    buckets.setdefault((row["seqlen"], row["batch_size"]), []).append(row["step_time_s"])
  return sum(statistics.median(times) * len(times) for times in buckets.values())


def init_loss(records) -> float | None:
  """The loss at initialization, one value for every run: the first training loss of the
  baseline's seed-0 runs (the same initialization and first batch at every LR, so the value
  never moves as runs are added; an SLW run's first batch holds 8-token sequences, whose loss
  is noisier and not the same quantity)."""
  firsts = [r.steps["loss"][0] for r in records
            if r.kind == "sweep" and r.arm == "baseline" and r.seed == 0]
  return statistics.mean(firsts) if firsts else None


def points(records: dict) -> dict[tuple[str, float, int], Point]:
  init = init_loss(records.values())
  return {(r.arm, r.lr, r.seed): point(r, init) for r in records.values() if r.kind == "sweep"}


def at_seed0(pts: dict, arm: str) -> dict[float, Point]:
  return {lr: p for (a, lr, seed), p in sorted(pts.items()) if a == arm and seed == 0}


def lr_sensitivity(sweep: dict[float, Point], lrs=None) -> float | None:
  chosen = [sweep[lr] for lr in (lrs or sorted(sweep)) if lr in sweep]
  finals = [p.final for p in chosen if p.final is not None]
  if not chosen or not finals:
    return None
  return statistics.mean(p.capped for p in chosen) - min(finals)


def best(sweep: dict[float, Point]) -> Point | None:
  finite = [p for p in sweep.values() if p.final is not None]
  return min(finite, key=lambda p: p.final) if finite else None


def noise_lr(lrs, baseline: dict[float, Point]) -> float:
  """The noise floor's LR: the baseline's best (its lowest LR when none ended finite)."""
  top = best(baseline)
  return top.lr if top else min(lrs)


def largest_stable(sweep: dict[float, Point]) -> float | None:
  stable = [lr for lr, p in sweep.items() if p.stable]
  return max(stable) if stable else None


def extra_lrs(lrs: tuple[float, ...], baseline: dict[float, Point]) -> tuple[float, ...]:
  """The 3 LRs of the extra arms: the baseline's best, its largest stable one, the next one up
  (when two coincide, the next LR up, then down, fills the third place)."""
  lrs = tuple(sorted(lrs))
  top = best(baseline)
  stable = largest_stable(baseline)
  chosen = {lr for lr in (top.lr if top else None, stable) if lr is not None}
  anchor = lrs.index(stable if stable is not None else (top.lr if top else lrs[0]))
  order = list(lrs[anchor + 1:]) + list(reversed(lrs[:anchor + 1]))
  for lr in order:
    if len(chosen) >= 3:
      break
    chosen.add(lr)
  return tuple(sorted(chosen))


def first_unstable(lrs: tuple[float, ...], baseline: dict[float, Point]) -> float:
  """The first of `lrs` above the baseline's largest stable LR (else the largest of `lrs`)."""
  stable = largest_stable(baseline) or 0.0
  return next((lr for lr in sorted(lrs) if lr > stable), max(lrs))


def seed_lrs(pts: dict, lrs: tuple[float, ...], arms: tuple[str, ...]) -> tuple[float, ...]:
  """The 2 LRs of the sweep where the arms run there (seed 0) spread most in min(final,
  init): where a difference between arms can be told from the noise, if anywhere."""
  def spread(lr):
    values = [pts[(arm, lr, 0)].capped for arm in arms if (arm, lr, 0) in pts]
    return max(values) - min(values) if len(values) > 1 else 0.0
  return tuple(sorted(sorted(lrs, key=lambda lr: (-spread(lr), lr))[:2]))


def mechanism_lr(pts: dict, lrs, extra, baseline: dict[float, Point]) -> float:
  """The LR where slw departs most from the baseline (seed 0): where the mechanism, if SLW
  has one here, should show (the baseline's first unstable LR when slw is not run)."""
  gaps = {lr: abs(pts[("slw", lr, 0)].capped - baseline[lr].capped) for lr in lrs
          if ("slw", lr, 0) in pts and lr in baseline}
  return max(gaps, key=lambda lr: (gaps[lr], -lr)) if gaps else first_unstable(extra, baseline)


def seeds_for_target(noise_std: float | None, target: float) -> int:
  """Seeds a point needs so that the standard error of its mean is at most `target`."""
  return 1 if noise_std is None else math.ceil((noise_std / target) ** 2)


def needed_seeds(noise_std: float | None, asked: int, target: float, most: int) -> int:
  """Seeds per point: the asked number, raised toward seeds_for_target up to `most`."""
  if noise_std is None or noise_std <= target:
    return asked
  return max(asked, min(most, seeds_for_target(noise_std, target)))


def mean_std(values) -> tuple[float | None, float | None, int]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None,
          len(values))


def seed_summary(pts: dict, arm: str, lr: float) -> tuple[float | None, float | None, int]:
  """Mean and sample std of min(final, init) over the seeds of one (arm, lr)."""
  return mean_std([p.capped for (a, l, _), p in pts.items() if a == arm and l == lr])


def noise_floor(pts: dict, lr: float, seeds: int) -> tuple[list[float], float | None]:
  """The noise floor's final losses (the baseline's seeds 0..seeds-1 at `lr`) and their
  sample std (later seeds of the seeded stage do not move it: the stage was sized by it)."""
  finals = [p.final for (a, l, seed), p in sorted(pts.items())
            if a == "baseline" and l == lr and seed < seeds]
  finite = [f for f in finals if f is not None]
  return finals, statistics.stdev(finite) if len(finite) > 1 else None


@dataclasses.dataclass
class Plan:
  """What the study decides from its own results (the live study and `analyse` alike)."""
  noise_lr: float  # The noise floor's LR (the baseline's best).
  floor: float | None  # The noise floor: the seed std of the baseline's final loss there.
  extra: tuple[float, ...]  # The 3 LRs of the extra arms.
  probe_lr: float  # The mechanism probe's and the equal-cost curves' LR (mechanism_lr).
  seeds: int  # Seeds of every arm at the seeded LRs.
  seed_lrs: tuple[float, ...]  # The 2 LRs where the arms differ most.


def plan(pts: dict, lrs, arms, noise_seeds: int, seeds: int, most: int, target: float) -> Plan:
  baseline = at_seed0(pts, "baseline")
  noise = noise_lr(lrs, baseline)
  extra = extra_lrs(lrs, baseline)
  _, floor = noise_floor(pts, noise, noise_seeds)
  return Plan(noise, floor, extra, mechanism_lr(pts, lrs, extra, baseline),
              needed_seeds(floor, seeds, target, most),
              seed_lrs(pts, lrs, tuple(a for a in arms if a in regime.SEED_LR_ARMS)))


def expected_runs(p: Plan, lrs, arms, noise_seeds: int, sweep_arms) -> list[tuple]:
  """Every (arm, lr, seed) a complete study holds under plan `p`."""
  runs = [("baseline", p.noise_lr, seed) for seed in range(noise_seeds)]
  runs += [(arm, lr, 0) for arm in arms if arm in sweep_arms for lr in lrs]
  runs += [(arm, lr, 0) for arm in arms if arm not in sweep_arms for lr in p.extra]
  runs += [(arm, lr, seed) for lr in p.seed_lrs for arm in arms for seed in range(p.seeds)
           if arm in sweep_arms or lr in p.extra]
  return list(dict.fromkeys(runs))


def probes(records: dict, lr: float) -> list:
  """The mechanism probes at `lr`, shortest length first."""
  return sorted((r for r in records.values() if r.kind == "mechanism" and r.lr == lr),
                key=lambda r: r.steps["seqlen"][0])


def _finite_max(values) -> float | None:
  finite = [v for v in values if math.isfinite(v)]
  return max(finite) if finite else None


def mechanism(records: dict, lr: float) -> list[dict]:
  """Per fixed length: the probe's gradient norm and Adam variance over its first steps."""
  rows = []
  for record in probes(records, lr):
    s = record.steps
    rows.append({"seqlen": s["seqlen"][0], "batch_size": s["batch_size"][0],
                 "tokens_per_step": s["seqlen"][0] * s["batch_size"][0], "steps": len(s["step"]),
                 "grad_norm_0": s["grad_norm"][0], "grad_norm_max": _finite_max(s["grad_norm"]),
                 "nu_max_peak": _finite_max(s["adam_nu_max"]), "nu_max_end": s["adam_nu_max"][-1],
                 "nu_l1_end": s["adam_nu_l1"][-1], "loss_end": s["loss"][-1],
                 "max_loss": _finite_max(s["loss"]), "lr": record.lr})
  return rows
