"""The paper's stability claim as an LR sweep: `python experiments/stability/run.py`.

One command, on the default corpus (the Python standard library), in the paper's aggressive
recipe in ratio (sweep_regime.py: LR warmup 8% of the baseline's tokens, cosine decay by
tokens, Adam beta2 0.999, clipping 1.0, equal token budget, SLW from 8 to a 32x longer
context). In order:
1. the baseline at every learning rate of the sweep (seed 0);
2. the noise floor: the baseline at its best learning rate over --noise-seeds seeds; when the
   seed std exceeds 0.03 nats, the seeded stage uses enough seeds that a mean's standard error
   does not (up to regime.MAX_NOISE_SEEDS);
3. slw, qk_norm, z_loss and adaptive (pacing.kind=adaptive, its defaults) at every learning
   rate;
4. at 3 learning rates (the baseline's best, its largest stable one and the next one up): the
   tuner (`slw_jax.tune`, its token cost reported), slw_tuned, shortformer, batch_warmup,
   slw+qk_norm and adaptive+backoff;
5. the mechanism probe: the first steps at fixed lengths with equal tokens per step;
6. --seeds seeds of every arm at the 2 of those learning rates where the arms of issue 23
   differ most (regime.SEED_LR_ARMS: an arm added later does not move them);
7. the analysis (sweep_analysis.py, sweep_tables.py, sweep_plots.py) into --results, from
   the per-run records (sweep_records.py) alone: `--analyse` redoes only this step, from the
   committed records.
Every run's record is written as it finishes, and a record of the same config is reused, so an
interrupted study resumes where it stopped (an unfinished run resumes from its checkpoint).
`--quick`: 3 learning rates, 5 of the sweep arms (regime.QUICK_ARMS), 1 seed. `--smoke`: a
1-block model for a few steps (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, HERE]

from slw_jax import config_diff, config_lib, errors, tune  # noqa: E402  (after the path)
import sweep_analysis as analysis  # noqa: E402
import sweep_plots as plots  # noqa: E402
import sweep_records as records  # noqa: E402
import sweep_regime as regime  # noqa: E402
import sweep_tables as tables  # noqa: E402

REGIME_FILE = "regime.json"  # In --out and records/: the regime their runs belong to.
STUDY_FILE = "study.json"  # In records/: the command, machine, regime and the study's settings.
MECHANISM_LENGTHS = (regime.SLW_START, 4 * regime.SLW_START)  # And the full length.


class StudyError(Exception):
  """Bad input, or a study that cannot give a result as asked (one line; exit status 2)."""


def run_name(arm: str, lr: float, seed: int) -> str:
  return f"{arm}_lr{lr:g}_seed{seed}"


class Study:
  def __init__(self, args, c):
    self.args, self.c = args, c
    self.lrs, self.arms = args.lrs, args.arms
    self.records_dir = os.path.join(os.path.dirname(os.path.abspath(args.results)), "records")
    self.recs = {}  # Run name -> records.Record, of this study's sweep runs so far.
    self.log = lambda message: print(message, flush=True)

  def config(self, overrides: dict, seed: int):
    return config_lib.with_overrides(self.c, {**overrides, "seed": seed})

  def train(self, name: str, kind: str, arm: str, lr: float, seed: int, c) -> records.Record:
    """The run's record: reused when recorded with this config, else trained (resuming from
    its checkpoint in --out) and recorded."""
    known = self._reusable(name, c, tuner=False)
    if known is not None:
      return known
    from slw_jax import trainer  # pylint: disable=g-import-not-at-top  (JAX only to train)
    workdir, started = os.path.join(self.args.out, name), time.time()
    self.log(f"{name}: training")
    try:
      summary = trainer.Trainer(c, workdir).run()
      outcome = {"completed": summary["completed"], "diverged": None,
                 "final_val_loss": summary["final_val_loss"]}
    except trainer.BadStepsStop as error:  # Diverged (monitor.max_bad_in_a_row): a result.
      outcome = {"completed": False, "diverged": str(error), "final_val_loss": None}
    if not outcome["completed"] and not outcome["diverged"]:
      raise StudyError(f"{workdir} stopped before its end (a signal): rerun to resume")
    outcome["seconds"] = round(time.time() - started, 1)
    record = records.from_workdir(name, kind, arm, lr, seed, c, outcome, workdir)
    records.write(self.records_dir, record)
    self.log(f"{name}: {'diverged' if outcome['diverged'] else 'finished'} in "
             f"{outcome['seconds']:.0f} s, final val loss {outcome['final_val_loss']}")
    return record

  def _reusable(self, name: str, c, tuner: bool = True) -> records.Record | None:
    """The record `name` when it was made with config `c` (None when there is none); a record
    of another config is refused. The tuner's settings count only for the tuner's record."""
    known = records.read(self.records_dir, name)
    if known is None:
      return None
    changed = config_diff.first_difference(records.fingerprint(known.config, tuner),
                                           records.fingerprint(records.flat_config(c), tuner))
    if changed:
      raise StudyError(f"{records.path(self.records_dir, name)} is a run of another regime "
                       f"({changed}): use another --results (and --out) for another regime")
    return known

  def arm(self, arm: str, lr: float, seed: int = 0):
    """Trains (or reuses) one arm's run into self.recs."""
    tuned = self.tuned(lr) if arm == "slw_tuned" else None
    c = self.config(regime.arm_overrides(self.c, arm, lr, tuned), seed)
    name = run_name(arm, lr, seed)
    self.recs[name] = self.train(name, "sweep", arm, lr, seed, c)

  def points(self) -> dict:
    return analysis.points(self.recs)

  def tuned(self, lr: float) -> tuple[int, int]:
    """The tuner's (seqlen_start, T) at `lr`; its cost goes into a record of kind "tune"."""
    name = f"tune_lr{lr:g}"
    c = self.config(regime.arm_overrides(self.c, "slw", lr), 0)  # It tunes start and T.
    known = self._reusable(name, c)
    if known is None:
      result = tune.Tuner(c, os.path.join(self.args.out, name), log=self.log).run()
      outcome = {k: result[k] for k in ("seqlen_start", "duration_steps", "flags", "tokens",
                                        "cost_fraction", "seconds")}
      outcome["trials"] = len(result["trials"])
      known = records.Record(name, "tune", "slw_tuned", lr, 0, records.flat_config(c),
                             outcome, {}, {})
      records.write(self.records_dir, known)
    return known.outcome["seqlen_start"], known.outcome["duration_steps"]

  def mechanism(self, lr: float):
    for seqlen in MECHANISM_LENGTHS + (self.c.model.max_seqlen,):
      c = self.config(regime.mechanism_overrides(self.c, seqlen, lr), 0)
      self.train(f"mechanism_len{seqlen}_lr{lr:g}", "mechanism", f"len{seqlen}", lr, 0, c)

  def run(self):
    """The stages in order. Each decision is the one sweep_analysis.plan makes from the runs
    it reads (the baseline's seed-0 runs, its noise seeds, every arm's seed-0 runs), so
    `analyse` recomputes the same decisions from the records."""
    arms, args = self.arms, self.args
    for lr in self.lrs:
      self.arm("baseline", lr)
    decide = lambda: analysis.plan(self.points(), self.lrs, arms, args.noise_seeds,  # noqa: E731
                                   args.seeds, args.max_seeds, regime.NOISE_TARGET)
    for seed in range(1, args.noise_seeds):
      self.arm("baseline", decide().noise_lr, seed)
    for arm in [a for a in regime.SWEEP_ARMS if a in arms and a != "baseline"]:
      for lr in self.lrs:
        self.arm(arm, lr)
    for lr in decide().extra:
      for arm in [a for a in arms if a not in regime.SWEEP_ARMS]:
        self.arm(arm, lr)
    self.mechanism(decide().probe_lr)
    final = decide()
    for lr in final.seed_lrs:
      for arm in [a for a in arms if a in regime.SWEEP_ARMS or lr in final.extra]:
        for seed in range(1, final.seeds):
          self.arm(arm, lr, seed)


# ----- the analysis: from the records alone ---------------------------------------------------


def analyse(records_dir: str, results: str) -> dict:
  """RESULTS.md and the plots beside it, recomputed from the records in `records_dir` (and the
  study's settings, records/study.json); a study that has not finished is refused."""
  about_path = os.path.join(records_dir, STUDY_FILE)
  if not os.path.exists(about_path):
    raise StudyError(f"{records_dir} holds no study ({STUDY_FILE} missing): run the study "
                     "first, with --results naming the RESULTS.md beside those records")
  with open(about_path) as f:
    about = json.load(f)
  recs = records.read_all(records_dir)
  pts = analysis.points(recs)
  lrs, arms = tuple(about["lrs"]), tuple(about["arms"])
  decided = analysis.plan(pts, lrs, arms, about["noise_seeds"], about["seeds"],
                          about["max_seeds"], regime.NOISE_TARGET)
  missing = [run_name(*key) for key in analysis.expected_runs(
      decided, lrs, arms, about["noise_seeds"], regime.SWEEP_ARMS) if key not in pts]
  if missing:
    raise StudyError(f"{records_dir} lacks {len(missing)} run(s) of its study (first: "
                     f"{missing[0]}): rerun `{about['command']}` to finish it")
  out = os.path.dirname(os.path.abspath(results))
  figures = [plots.lr_sweep(pts, arms, decided.seed_lrs, out),
             plots.curves(recs, decided.probe_lr, out, "equal_cost.png"),
             plots.mechanism(recs, decided.probe_lr, out)]
  if "adaptive" in arms:
    figures.append(plots.adaptive_lengths(recs, out))
  with open(results, "w") as f:
    f.write(render(about, pts, recs, decided, figures))
  return pts


def render(about, pts, recs, decided, figures) -> str:
  c, lrs, arms = about["regime"], tuple(about["lrs"]), tuple(about["arms"])
  seconds = sum(r.outcome.get("seconds", 0.0) for r in recs.values())
  lines = [
      "# Stability study: the LR sweep", "",
      "Written by run.py from the per-run records in `records/` (`run.py --analyse` recomputes "
      "every table and plot from them); what they say: NOTES.md.", "",
      f"Command: `{about['command']}`", "",
      f"Machine: {about['machine']}; the runs and the tuner trained for {seconds / 60:.1f} min "
      "in all (their own records).", "",
      f"Regime (`{about['preset']}`): {c['model.n_layer']} blocks of width {c['model.d_model']}, "
      f"context {c['model.max_seqlen']}, {c['batch_size']} sequences per step, "
      f"{c['train_tokens']:,} training tokens for every arm, LR warmup "
      f"{c['optim.warmup_tokens']:,} tokens (8% of the baseline's), cosine decay by tokens to "
      f"lr/10, Adam beta2 {c['optim.b2']}, clipping {c['optim.clip_norm']}; slw from "
      f"{regime.SLW_START} over {about['slw_steps']} steps; z_loss {regime.Z_LOSS}. Validation:"
      f" {c['eval.batches'] * c['eval.batch_size']} full-length windows, the same for every run.",
      "", "## Final validation loss against the learning rate (seed 0)", "",
      f"![{figures[0]}]({figures[0]})", ""]
  lines += tables.sweep_table(pts, lrs, arms)
  lines += ["", "`div`: diverged (stopped by monitor.max_bad_in_a_row); `(init~)`: ended within "
            "10% of its initial loss.", "", "Grid:"] + tables.grid_check(pts, lrs, decided.floor)
  lines += ["", "## Per arm: LR sensitivity, best loss, stable range", "",
            "LR sensitivity (Wortsman et al. 2023): mean over the LRs of min(final, initial "
            "loss) minus the best final loss. Lower is less sensitive.", ""]
  lines += tables.summary_table(pts, arms, decided.extra)
  lines += ["", "## The noise floor", ""] + tables.noise_section(
      pts, decided.noise_lr, decided.floor, about["noise_seeds"], decided.seeds)
  where = ", ".join(f"{lr:g}" for lr in decided.seed_lrs)
  lines += ["", f"## Seeds at the 2 LRs where the arms differ most ({where})", "",
            "`2 x seed std`: twice the seed std of the arm and the baseline at that LR, pooled "
            "(the root of their mean square); `beyond 2 std` says whether the difference of the "
            "means exceeds it. The last column is the difference over its standard error "
            "(Welch): the same difference read as a test of the means.", ""]
  lines += tables.seeds_table(pts, decided.seed_lrs, arms)
  lines += ["", "## Tables 1 and 3 at every LR (seed 0)", ""] + tables.stability_table(pts, lrs,
                                                                                       arms)
  lines += mechanism_lines(recs, decided, figures[2])
  lines += ["", f"## Equal cost, not only equal tokens (seed 0, at the 3 LRs of the extra arms;"
            f" curves at lr {decided.probe_lr:g}, where slw departs most from the baseline)", "",
            "SLW and the warmups take more optimizer steps for the same tokens. Time is the sum "
            "of step times on this machine without compile stalls (each bucket's median step "
            "time times its steps); FLOPs are the model's 6N + attention count.", ""]
  lines += tables.cost_table(pts, decided.extra, arms) + ["", f"![{figures[1]}]({figures[1]})"]
  tunes = {r.lr: r.outcome for r in recs.values() if r.kind == "tune"}
  if tunes:
    lines += ["", "## The tuner's choice and cost (slw_jax.tune)", ""] + tables.tune_table(tunes)
  adaptive = tables.adaptive_section(pts, lrs, decided.extra, decided.seed_lrs, tunes, arms)
  if adaptive:
    lines += ["", "## Adaptive pacing against the tuned schedule (issue 24)", ""] + adaptive
    lines += ["", f"![{figures[3]}]({figures[3]})"]
  return "\n".join(lines) + "\n"


def mechanism_lines(recs, decided, figure) -> list[str]:
  rows = analysis.mechanism(recs, decided.probe_lr)
  if not rows:
    return []
  return (["", f"## The mechanism: the first steps at one length (lr "
           f"{decided.probe_lr:g}, where slw departs most from the baseline)", "",
           "Each probe trains the first 2 LR warmups at one fixed sequence length with the "
           "baseline's tokens per step, so only the length differs.", ""]
          + tables.mechanism_table(rows) + ["", f"![{figure}]({figure})"])


# ----- the command line -----------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise StudyError(f"--lrs={text!r} is invalid: give comma-separated numbers, e.g. "
                     "--lrs=0.001,0.01,0.1") from None
  increasing = all(b > a for a, b in zip(values, values[1:]))
  if len(values) < 3 or not increasing or not all(math.isfinite(v) and v > 0 for v in values):
    raise StudyError(f"--lrs={text!r} is invalid: give at least 3 finite positive learning "
                     "rates in strictly increasing order")
  return values


def _arms(text: str) -> tuple[str, ...]:
  names = tuple(x.strip() for x in text.split(",") if x.strip())
  unknown = [n for n in names if n not in regime.ARMS]
  if unknown or "baseline" not in names:
    bad = unknown[0] if unknown else text
    raise StudyError(f"--arms={text!r} is invalid ({bad!r}): allowed arms are "
                     f"{', '.join(regime.ARMS)}, and baseline must be one of them")
  return tuple(a for a in regime.ARMS if a in names)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="example: "
                                   "python experiments/stability/run.py --quick")
  parser.add_argument("--preset", default="cpu", choices=sorted(regime.PRESETS),
                      help="Regime (sweep_regime.py): cpu (default), gpu (issue 23 item 6) or "
                      "smoke.")
  parser.add_argument("--smoke", action="store_true", help="Same as --preset=smoke.")
  parser.add_argument("--quick", action="store_true",
                      help="3 learning rates, 5 of the sweep arms, 1 seed (results in --out).")
  parser.add_argument("--lrs", default=None, help="Comma-separated, increasing (default: the "
                      "preset's; --quick: its 1st, 3rd and 5th).")
  parser.add_argument("--arms", default=None, help=f"Comma-separated, of {', '.join(regime.ARMS)}"
                      " (default all; --quick and the gpu preset: regime.QUICK_ARMS, 5 of the "
                      "sweep arms).")
  parser.add_argument("--seeds", type=int, default=None, help="Seeds at the 2 LRs where the arms"
                      " differ most (default 3; --quick and the gpu preset 1).")
  parser.add_argument("--noise-seeds", type=int, default=None,
                      help="Seeds of the noise floor (default 4; --quick 1).")
  parser.add_argument("--max-seeds", type=int, default=None,
                      help="The most seeds per point when the noise floor asks for more "
                      f"(default {regime.MAX_NOISE_SEEDS}; --quick and the gpu preset 1).")
  parser.add_argument("--out", default=None, help="Run directories (default runs/stability or "
                      "runs/stability_<preset>[_quick]).")
  parser.add_argument("--results", default=None, help="RESULTS.md to write; records/ beside it "
                      "(default experiments/stability/RESULTS.md for the cpu preset, else OUT/).")
  parser.add_argument("--analyse", action="store_true",
                      help="Only recompute RESULTS.md and the plots from the records.")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="Override a regime field, e.g. --set model.d_model=96 (repeatable).")
  args = parser.parse_args(argv)
  return _defaults(args)


def _defaults(args):
  if args.smoke:
    args.preset = "smoke"
  _, preset_lrs, _ = regime.PRESETS[args.preset]
  # The gpu preset fits about 10 minutes of one device: 5 sweep arms, one seed per point.
  light = args.quick or args.preset == "gpu"
  args.lrs = _floats(args.lrs) if args.lrs is not None else (
      preset_lrs[0:5:2] if args.quick and len(preset_lrs) >= 5 else preset_lrs)
  args.arms = (_arms(args.arms) if args.arms is not None
               else regime.QUICK_ARMS if light else regime.ARMS)
  defaults = {"seeds": 1 if light else 3, "noise_seeds": 1 if args.quick else 4,
              "max_seeds": 1 if light else regime.MAX_NOISE_SEEDS}
  for flag, default in defaults.items():
    value = getattr(args, flag)
    if value is None:
      setattr(args, flag, default)
    elif value < 1:
      raise StudyError(f"--{flag.replace('_', '-')}={value} is invalid: must be >= 1")
  suffix = "" if args.preset == "cpu" else f"_{args.preset}"
  args.out = args.out or os.path.join(REPO, "runs", f"stability{suffix}"
                                      + ("_quick" if args.quick else ""))
  default_results = (os.path.join(HERE, "RESULTS.md") if args.preset == "cpu" and not args.quick
                     else os.path.join(args.out, "RESULTS.md"))
  args.results = args.results or default_results
  return args


def regime_config(args):
  overrides = regime.regime_overrides(args.preset)
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise StudyError(f"--set {item!r} is invalid: use KEY=VALUE, e.g. --set optim.b2=0.99")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  path = os.path.join(REPO, "configs", "tiny.py")
  for key in [item.partition("=")[0] for item in args.set]:  # Name a --set that cannot apply.
    try:
      config_lib.load_config_file(path, {key: overrides[key]})
    except (AttributeError, KeyError, TypeError, ValueError) as error:
      raise StudyError(f"--set {key}={overrides[key]!r} is invalid: {error}") from None
  try:
    c = config_lib.validate(config_lib.load_config_file(path, overrides))
    for arm in args.arms:  # Every arm's config is valid before anything trains.
      for lr in args.lrs:
        config_lib.with_overrides(c, regime.arm_overrides(c, arm, lr, (regime.SLW_START, 1)))
    if "slw_tuned" in args.arms:  # The tuner's cost bound (TuneError), now, not mid-study: its
      # constructor checks it (the bound counts tokens: any LR) and only reads a state file.
      tune.Tuner(config_lib.with_overrides(c, regime.arm_overrides(c, "slw", args.lrs[0])),
                 os.path.join(args.out, "never_written"))
  except errors.ConfigError as error:
    raise StudyError(str(error)) from None
  return c


def regime_fingerprint(c) -> dict:
  """What makes a regime: the baseline's config but its learning rate (and paths, logging)."""
  return {k: v for k, v in records.fingerprint(records.flat_config(c), tuner=True).items()
          if k not in ("optim.lr", "optim.min_lr")}


def check_regime(directory: str, flag: str, fingerprint: dict):
  """`directory` (--out, or the records beside --results) belongs to one regime: refuse
  another with one line, before anything trains; record it for the next invocation."""
  path = os.path.join(directory, REGIME_FILE)
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    # Keys added since at their defaults, settings that do nothing in it dropped (the same
    # rule as `fingerprint`); not the keys a regime leaves out (its LR).
    stored = {k: v for k, v in records.fingerprint(stored, tuner=True).items()
              if k in stored or k in fingerprint}
    changed = config_diff.first_difference(stored, fingerprint)
    if changed:
      raise StudyError(f"{flag}={directory} holds runs of another regime ({changed}): use a "
                       "new --out and --results for another regime")
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(fingerprint, f, indent=1)


def about_study(args, argv, c) -> dict:
  return {"command": " ".join(["python experiments/stability/run.py", *argv]),
          "preset": args.preset, "slw_steps": regime.slw_steps(c),
          "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
                     f"Python {platform.python_version()}",
          "lrs": list(args.lrs), "arms": list(args.arms), "seeds": args.seeds,
          "noise_seeds": args.noise_seeds, "max_seeds": args.max_seeds,
          "regime": records.flat_config(c)}


def study(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  records_dir = os.path.join(os.path.dirname(os.path.abspath(args.results)), "records")
  if args.analyse:
    return analyse(records_dir, args.results)
  c = regime_config(args)
  fingerprint = regime_fingerprint(c)
  check_regime(args.out, "--out", fingerprint)
  check_regime(records_dir, "--results", fingerprint)
  with open(os.path.join(records_dir, STUDY_FILE), "w") as f:
    json.dump(about_study(args, argv, c), f, indent=1)
  Study(args, c).run()
  return analyse(records_dir, args.results)


def main():
  try:
    study()
  except (StudyError, tune.TuneError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except errors.StopTraining as error:  # E.g. a run's workdir resumed under another config.
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
