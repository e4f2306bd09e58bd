"""RESULTS.md of the LR-sweep study, from the records' numbers (sweep_analysis.py)."""

from __future__ import annotations

import sweep_analysis as analysis
import sweep_regime as regime

# The seed-0 sweep's cells: "div" for a diverged run, "nan" for one that ended with a
# non-finite loss, "init~" for one that learned (almost) nothing (final loss above 90% of its
# initial loss).


def _f(value, spec=".3f") -> str:
  return "n/a" if value is None else format(value, spec)


def _cell(p: analysis.Point | None) -> str:
  if p is None:
    return ""
  if p.final is None:
    return "div" if p.diverged else "nan"
  return _f(p.final) + ("" if p.stable else " (init~)")


def _lr(lr: float) -> str:
  return f"{lr:g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
          + ["| " + " | ".join(row) + " |" for row in rows])


def sweep_table(pts, lrs, arms) -> list[str]:
  rows = [[arm] + [_cell(pts.get((arm, lr, 0))) for lr in lrs] for arm in arms]
  return _table(["arm"] + [f"lr {_lr(lr)}" for lr in lrs], rows)


def summary_table(pts, arms, common) -> list[str]:
  rows = []
  for arm in arms:
    sweep = analysis.at_seed0(pts, arm)
    top, stable = analysis.best(sweep), analysis.largest_stable(sweep)
    rows.append([arm, str(len(sweep)), _f(analysis.lr_sensitivity(sweep)),
                 _f(analysis.lr_sensitivity(sweep, common)),
                 _f(top.final) if top else "n/a", _lr(top.lr) if top else "n/a",
                 "none" if stable is None else _lr(stable)])
  return _table(["arm", "LRs run", "LR sensitivity (its LRs)",
                 f"LR sensitivity ({', '.join(_lr(x) for x in common)})", "best final loss",
                 "at lr", "largest stable lr"], rows)


def stability_table(pts, lrs, arms) -> list[str]:
  rows = []
  for lr in lrs:
    for arm in arms:
      p = pts.get((arm, lr, 0))
      if p is not None:
        rows.append([_lr(lr), arm, str(p.steps), str(p.above), _f(p.max_ratio), _f(p.r_l1),
                     _f(p.r_max), _cell(p)])
  return _table(["lr", "arm", "steps", f"ratio > {analysis.UNSTABLE_RATIO}", "max ratio",
                 "r(ratio, nu l1)", "r(ratio, nu max)", "final val loss"], rows)


def noise_section(pts, lr, std, noise_seeds: int, seeds_used: int) -> list[str]:
  finals, _ = analysis.noise_floor(pts, lr, noise_seeds)
  target = regime.NOISE_TARGET
  lines = [f"Baseline at lr {_lr(lr)} (its best), {len(finals)} seeds: final validation loss "
           + ", ".join(_f(f) if f is not None else "div" for f in finals)
           + f"; sample std **{_f(std, '.4f')}** nats. Every difference below is read "
           "against it."]
  if std is None or std <= target:
    return lines + ["", f"That is within the {target}-nat target."]
  needed = analysis.seeds_for_target(std, target)
  return lines + ["", f"That is above the {target}-nat target the run sizes were chosen for. A "
                  f"mean then needs {needed} seeds for a standard error of {target}; the seeded "
                  f"points use {seeds_used} (standard error {std / seeds_used ** 0.5:.3f})."]


def seeds_table(pts, seed_lrs, arms) -> list[str]:
  rows = []
  for lr in seed_lrs:
    base, base_std, base_n = analysis.seed_summary(pts, "baseline", lr)
    for arm in arms:
      mean, std, n = analysis.seed_summary(pts, arm, lr)
      if not n:
        continue
      cells = [_lr(lr), arm, str(n), _f(mean), _f(std, ".4f")]
      if arm == "baseline" or None in (mean, base, std, base_std):
        rows.append(cells + ["", "", "", ""])
        continue
      delta, pooled = mean - base, ((std ** 2 + base_std ** 2) / 2) ** 0.5
      error = (std ** 2 / n + base_std ** 2 / base_n) ** 0.5
      rows.append(cells + [_f(delta, "+.3f"), _f(2 * pooled), "yes" if abs(delta) > 2 * pooled
                           else "no", _f(delta / error if error else None, "+.1f")])
  return _table(["lr", "arm", "seeds", "mean min(final, init)", "seed std", "vs baseline",
                 "2 x seed std", "beyond 2 std", "difference / its std error"], rows)


def mechanism_table(rows) -> list[str]:
  return _table(
      ["seqlen", "sequences", "tokens/step", "steps", "grad norm step 0", "max grad norm",
       "peak max sqrt(nu)", "max sqrt(nu) at end", "l1 sqrt(nu) at end", "max loss",
       "loss at end"],
      [[str(r["seqlen"]), str(r["batch_size"]), f"{r['tokens_per_step']:,}", str(r["steps"]),
        _f(r["grad_norm_0"]), _f(r["grad_norm_max"]), _f(r["nu_max_peak"], ".3g"),
        _f(r["nu_max_end"], ".3g"), _f(r["nu_l1_end"], ".4g"), _f(r["max_loss"]),
        _f(r["loss_end"])] for r in rows])


def cost_table(pts, lrs, arms) -> list[str]:
  rows = []
  for lr in lrs:
    for arm in arms:
      p = pts.get((arm, lr, 0))
      if p is not None:
        rows.append([_lr(lr), arm, str(p.steps), f"{p.tokens:,}", f"{p.train_s:.1f}",
                     f"{p.flops / 1e12:.4g}", _cell(p)])
  return _table(["lr", "arm", "optimizer steps", "tokens", "summed step s", "TFLOPs",
                 "final val loss"], rows)


def tune_table(tunes: dict) -> list[str]:
  return _table(["lr", "chosen", "tokens", "share of one run", "s", "trials"],
                [[_lr(lr), f"`{t['flags']}`", f"{t['tokens']:,}", f"{t['cost_fraction']:.1%}",
                  f"{t['seconds']:.0f}", str(t["trials"])] for lr, t in sorted(tunes.items())])


def grid_check(pts, lrs, floor) -> list[str]:
  """Whether the grid spans what the issue asks: the baseline's lowest LR under-trains, its
  highest diverges or ends near its initial loss."""
  base = analysis.at_seed0(pts, "baseline")
  low, high, top = base.get(lrs[0]), base.get(lrs[-1]), analysis.best(base)
  margin = 2 * (floor or 0.0)
  under = low is not None and top is not None and low.capped > top.final + margin
  over = high is not None and not high.stable
  return [f"- lowest lr {_lr(lrs[0])} under-trains (ends above the best by more than twice the "
          f"noise floor): **{'yes' if under else 'no'}**",
          f"- highest lr {_lr(lrs[-1])} diverges or ends within 10% of its initial loss: "
          f"**{'yes' if over else 'no'}**"]


def unstable_lrs(pts, lrs) -> tuple[float, ...]:
  """The LRs where the baseline (seed 0) is unstable: it diverged, or had steps with a loss
  ratio above UNSTABLE_RATIO."""
  base = analysis.at_seed0(pts, "baseline")
  return tuple(lr for lr in lrs if lr in base and (base[lr].final is None or base[lr].above))


def adaptive_section(pts, lrs, extra, seed_lrs, tunes, arms) -> list[str]:
  """Issue 24's targets: adaptive (its defaults) against slw_tuned where the baseline is
  unstable, its LR sensitivity on slw_tuned's LRs, and the tuning tokens each needs."""
  ours = [a for a in arms if a.startswith("adaptive")]
  if not ours or "slw_tuned" not in arms:
    return []
  unstable = unstable_lrs(pts, lrs)
  compared = ["slw_tuned", "slw", *ours]
  rows = []
  for arm in compared:
    sweep = analysis.at_seed0(pts, arm)
    rows.append([arm, _f(analysis.lr_sensitivity(sweep, extra))]
                + [_cell(sweep.get(lr)) for lr in unstable])
  lines = _table(["arm", f"LR sensitivity ({', '.join(_lr(x) for x in extra)})"]
                 + [f"lr {_lr(lr)}" for lr in unstable], rows)
  lines += ["", f"The baseline is unstable (diverged, or loss ratio above "
            f"{analysis.UNSTABLE_RATIO}) at lr {', '.join(_lr(x) for x in unstable)}; slw_tuned "
            "ran at the extra LRs only. Seeds where both ran them:", ""]
  seeded = []
  for lr in seed_lrs:
    tuned_mean, tuned_std, tuned_n = analysis.seed_summary(pts, "slw_tuned", lr)
    for arm in ours:
      mean, std, n = analysis.seed_summary(pts, arm, lr)
      if not n or not tuned_n or None in (mean, tuned_mean, tuned_std):
        continue
      delta = mean - tuned_mean
      verdict = "better" if delta < 0 else ("within" if delta <= tuned_std else "worse")
      seeded.append([_lr(lr), arm, str(n), _f(mean), _f(std, ".4f"), str(tuned_n),
                     _f(tuned_mean), _f(tuned_std, ".4f"), _f(delta, "+.3f"),
                     f"{verdict} (one slw_tuned seed std)"])
  lines += _table(["lr", "arm", "seeds", "mean", "seed std", "slw_tuned seeds", "slw_tuned mean",
                   "slw_tuned seed std", "difference", "verdict"], seeded)
  cost = ", ".join(f"lr {_lr(lr)}: {t['tokens']:,} tokens ({t['cost_fraction']:.1%} of a run)"
                   for lr, t in sorted(tunes.items()))
  return lines + ["", f"Tuning tokens: adaptive 0 (its defaults at every LR); slw_tuned's tuner "
                  f"{cost}."]
