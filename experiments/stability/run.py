"""The paper's stability claim in miniature: `python experiments/stability/run.py`.

One command, on the default corpus (the Python standard library), a small model at a batch
size and learning rate where the baseline is visibly unstable (REGIME; how it was found is in
NOTES.md). In order:
1. the baseline at the high learning rate; if its loss ratio never exceeds the monitor's
   threshold (1.2), the study stops and says so: no comparison is invented for a stable
   baseline;
2. the low-cost tuner (`slw_jax.tune`) picks SLW's seqlen_start and T at that learning rate;
3. the other arms at the same token budget: the baseline at a safe lower learning rate, and at
   the high one SLW linear with the tuner's choice, Shortformer's 2-stage schedule and GPT-3's
   batch-size warmup; then the headline arms (baseline, SLW) over more seeds;
4. the analysis, through `slw_jax.report`, into `--results`: the Table 1 analog (steps with loss
   ratio above 1.1/1.2/1.5, max ratio) with OLMo-core's SpikeScore, the Table 3 analog (Pearson
   r of the loss ratio with Adam's variance l1 and max), the final validation loss at equal
   tokens, tokens and training time to a common validation loss (Table 2 analog), the spread
   over seeds, and the loss / ratio / variance plots (Figures 1 and 4).
Runs finished in --out are reused, so an interrupted study resumes (and a rerun only redoes the
analysis). `--smoke` runs a few steps
per arm on a 1-layer model and writes its results into --out (the test suite runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from slw_jax import config_lib, pacing, report, tune  # noqa: E402  (after the path)

THRESHOLDS = (1.1, 1.2, 1.5)  # Table 1 analog columns.
UNSTABLE_RATIO = 1.2  # The baseline must exceed this loss ratio somewhere (the paper's bar).
ARMS = ("baseline", "baseline_safe_lr", "slw", "shortformer", "batch_warmup")
HEADLINE = ("baseline", "slw")  # Repeated over --seeds.
DONE_FILE = "study_arm.json"  # How an arm's run ended; its presence marks the arm done.

# The unstable regime on configs/tiny.py (NOTES.md says how it was found): 8K tokens per step
# (64 x 128), LR 0.1 (50x tiny's) after a 3-step warmup (~1% of the run, as the paper's 3K of
# 300K steps), GPT-2's Adam beta2 0.999; 2.1M tokens (260 baseline steps). The tuner's windows
# are scaled the same way: "a few multiples" of that warmup, at most 10% of the run.
REGIME = {"batch_size": 64, "train_tokens": 2_129_920, "train_steps": None,
          "model.max_seqlen": 128, "pacing.kind": "none", "optim.lr": 0.1, "optim.min_lr": 0.01,
          "optim.warmup_steps": 3, "optim.b2": 0.999, "eval.every_steps": 20,
          "eval.batches": 4, "eval.batch_size": 32, "checkpoint.every_steps": 100,
          "log.print_every_steps": 50, "batch_warmup.multiple": 4,
          "tune.seqlen_starts": (32, 64), "tune.first_duration_warmups": 10,
          "tune.max_duration_warmups": 50, "tune.start_window_warmups": 2.0,
          "tune.window_warmups": 3.0, "tune.search_trials": 2, "tune.evals_per_warmup": 1,
          "tune.eval_batches": 2}
SAFE_LR = 0.03  # find_regime.py: no step above 1.2 at 0.03 (and at 0.01 one early step).

# Smoke: a 1-layer model for a few steps at a learning rate that blows the baseline up.
SMOKE = {"model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.max_seqlen": 32,
         "batch_size": 16, "train_tokens": 6_144, "train_steps": None, "pacing.kind": "none",
         "batch_warmup.multiple": 8,  # The test suite's 8 simulated devices split every batch.
         "pacing.multiple": 8, "optim.lr": 3.0, "optim.min_lr": 0.3, "optim.warmup_steps": 2,
         "optim.clip_norm": 0.0, "eval.every_steps": 4, "eval.batches": 1,
         "eval.batch_size": 8, "checkpoint.every_steps": 100, "compile.pad_multiple": 16,
         "data.val_fraction": 0.1,
         "tune.seqlen_starts": (8,), "tune.first_duration_warmups": 1,
         "tune.max_duration_warmups": 2, "tune.start_window_warmups": 1.0,
         "tune.window_warmups": 1.0, "tune.search_trials": 1, "tune.evals_per_warmup": 2,
         "tune.eval_batches": 1, "tune.max_cost_fraction": 1.0}
SMOKE_SAFE_LR = 3e-3


class StudyError(Exception):
  """The study cannot give a result as asked (printed as one line; exit status 1)."""


@dataclasses.dataclass
class Study:
  config: object  # The regime's validated config (the baseline arm).
  out: str
  safe_lr: float
  seeds: int

  def arm_config(self, name: str, seed: int, tuned: tuple[int, int] | None = None):
    return config_lib.with_overrides(self.config, {**self.arm_overrides(name, tuned),
                                                   "seed": seed})

  def arm_overrides(self, name: str, tuned) -> dict:
    c, end = self.config, self.config.pacing.seqlen_end
    if name == "baseline":
      return {}
    if name == "baseline_safe_lr":
      return {"optim.lr": self.safe_lr, "optim.min_lr": self.safe_lr / 10}
    if name == "slw":
      return {"pacing.kind": "linear", "pacing.seqlen_start": tuned[0],
              "pacing.duration_steps": tuned[1]}
    if name == "shortformer":  # Paper 5.1: seqlen_end / 8 for about half the baseline's steps.
      stage = max(c.pacing.multiple, end // 8 - (end // 8) % c.pacing.multiple)
      half = pacing.run_schedule(c).num_steps // 2
      return {"pacing.kind": "discrete", "pacing.stages": ((stage, half - 1),)}
    if name == "batch_warmup":  # Paper 5.1: batch / 32 (128 of 4K) over SLW's warmup tokens.
      slw = config_lib.with_overrides(c, self.arm_overrides("slw", tuned))
      tokens = int(pacing.walk(slw, stop_steps=tuned[1]).total_tokens)
      start = max(c.batch_warmup.multiple, c.batch_size // 32)  # The multiple keeps compiles few.
      return {"batch_warmup.start": start, "batch_warmup.tokens": tokens}
    raise ValueError(f"unknown arm {name!r}")

  def workdir(self, name: str, seed: int) -> str:
    return os.path.join(self.out, f"{name}_seed{seed}")


def run_arm(c, workdir: str) -> dict:
  """Trains one arm in `workdir` and records how it ended in DONE_FILE (a run stopped by
  monitor.max_bad_in_a_row diverged: that is a result too; 20 steps in a row with a non-finite
  loss or a loss ratio above 2), or reads that record (of the same config only)."""
  done, config = os.path.join(workdir, DONE_FILE), json.loads(json.dumps(c.to_dict()))
  if os.path.exists(done):
    with open(done) as f:
      record = json.load(f)
    if record["config"] != config:
      changed = config_lib.first_difference(record["config"], config)
      raise StudyError(f"{workdir} holds a run of another regime ({changed}): use a new --out "
                       "for another regime")
    print(f"{workdir}: finished earlier, reused", flush=True)
    return record
  from slw_jax import trainer  # pylint: disable=g-import-not-at-top  (JAX only when training)
  started = time.time()
  try:
    summary = trainer.Trainer(c, workdir).run()
    record = {"completed": summary["completed"], "diverged": None,
              "final_val_loss": summary["final_val_loss"]}
  except trainer.BadStepsStop as error:  # Diverged (monitor.max_bad_in_a_row): a result too.
    record = {"completed": False, "diverged": str(error), "final_val_loss": None}
  if not record["completed"] and not record["diverged"]:
    raise StudyError(f"{workdir} stopped before its end (a signal): rerun to resume")
  record.update(seconds=round(time.time() - started, 1), config=config)
  with open(done, "w") as f:
    json.dump(record, f)
  print(f"{workdir}: {'diverged' if record['diverged'] else 'finished'} in "
        f"{record['seconds']:.0f} s, final val loss {record['final_val_loss']}", flush=True)
  return record


def _record(workdir: str) -> dict:
  with open(os.path.join(workdir, DONE_FILE)) as f:
    return json.load(f)


def check_unstable(run: report.Run, config) -> float:
  """The baseline's max loss ratio; StudyError if it never exceeds UNSTABLE_RATIO."""
  # A non-finite loss is the most unstable step there is.
  max_ratio = max((r["loss_ratio"] if math.isfinite(r["loss"]) else math.inf
                   for r in run.steps), default=0.0)
  if not max_ratio > UNSTABLE_RATIO:
    raise StudyError(
        f"the baseline never became unstable (max loss ratio {max_ratio:.3f} <= "
        f"{UNSTABLE_RATIO} at optim.lr={config.optim.lr}, batch_size={config.batch_size}): this "
        "regime cannot show a stability benefit; raise optim.lr or batch_size (--set)")
  return max_ratio


def table_row(run: report.Run) -> dict:
  """Tables 1 and 3 analogs for one run, with SpikeScore and its final validation loss."""
  stats = report.stability(run, UNSTABLE_RATIO)
  ratios = [r["loss_ratio"] for r in run.steps]
  finals = [e["val_loss"] for e in run.evals]
  return {**{f"above_{t}": sum(1 for x in ratios if x > t) for t in THRESHOLDS},
          "steps": len(run.steps), "max_ratio": stats["max_loss_ratio"],
          "spike_score": stats["spike_score"], "spike_steps": stats["spike_steps"],
          "r_l1": stats["pearson_loss_ratio_vs_adam_nu_l1"]["r"],
          "r_max": stats["pearson_loss_ratio_vs_adam_nu_max"]["r"],
          "final_val_loss": finals[-1] if finals else None,
          "tokens": int(run.steps[-1]["tokens"] + run.steps[-1]["seqlen"]
                        * run.steps[-1]["batch_size"]) if run.steps else 0}


def _f(value, spec=".3f") -> str:
  return "n/a" if value is None else format(value, spec)


def spread(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "n/a"
  if len(values) == 1:
    return _f(values[0])
  return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def render(study: Study, rows: dict, runs: dict, tuned, tune_result, target, reached,
           plots: list[str], command: str, seconds: float) -> str:
  """RESULTS.md: the command, the machine, the tables and the plots."""
  lines = ["# Stability study: results", "",
           "Written by run.py; how the regime was found and what these tables say: NOTES.md.", "",
           f"Command: `{command}`", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
           f"Python {platform.python_version()}; the arms and the tuner trained for "
           f"{seconds / 60:.1f} min in all (their own records; setup and analysis add about a "
           "minute).", "",
           f"Tuner (slw_jax.tune): `{tune_result['flags']}` for {tune_result['tokens']:,} tokens"
           f" ({tune_result['cost_fraction']:.1%} of one run), {tune_result['seconds']:.0f} s, "
           f"{len(tune_result['trials'])} trials.", "",
           "## Table 1 and 3 analogs (seed 0 of every arm)", "",
           "| arm | steps | ratio > 1.1 | ratio > 1.2 | ratio > 1.5 | max ratio | SpikeScore "
           "(spiking steps) | r(ratio, nu l1) | r(ratio, nu max) | final val loss |",
           "| --- " * 10 + "|"]
  for name in ARMS:
    r = rows[(name, 0)]
    lines.append(f"| {name} | {r['steps']} | {r['above_1.1']} | {r['above_1.2']} | "
                 f"{r['above_1.5']} | {_f(r['max_ratio'])} | {_f(r['spike_score'], '.4f')} "
                 f"({r['spike_steps']}) | {_f(r['r_l1'])} | {_f(r['r_max'])} | "
                 f"{_f(r['final_val_loss'])} |")
  lines += ["", f"## Headline arms over {study.seeds} seeds (mean ± sample std)", "",
            "| arm | ratio > 1.2 | max ratio | SpikeScore | final val loss |",
            "| --- | --- | --- | --- | --- |"]
  for name in HEADLINE:
    seeds = [rows[(name, s)] for s in range(study.seeds)]
    lines.append(f"| {name} | {spread([r['above_1.2'] for r in seeds])} | "
                 f"{spread([r['max_ratio'] for r in seeds])} | "
                 f"{spread([r['spike_score'] for r in seeds])} | "
                 f"{spread([r['final_val_loss'] for r in seeds])} |")
  lines += ["", "## The loss ratio at small token counts (SLW, seed 0)", "",
            "Early SLW steps hold few tokens, so their loss is noisier: the ratio measures that "
            "noise as well as divergence.", "",
            "| seqlen | tokens per step | steps | ratio > 1.1 | ratio > 1.2 | max ratio |",
            "| --- | --- | --- | --- | --- | --- |"]
  for seqlen, steps in _by_seqlen(runs[("slw", 0)].steps):
    ratios = [r["loss_ratio"] for r in steps]
    lines.append(f"| {seqlen} | {seqlen * steps[0]['batch_size']:,} | {len(steps)} | "
                 f"{sum(x > 1.1 for x in ratios)} | {sum(x > 1.2 for x in ratios)} | "
                 f"{_f(max(ratios))} |")
  lines += ["", "## Table 2 analog: tokens and training time to a common validation loss", ""]
  if target is None:
    lines.append("No arm has a finite validation loss.")
  else:
    lines += [f"Target: {target:.4f}, the best validation loss every arm reaches (seed 0). "
              "Training time is the sum of step times.", "",
              "| arm | tokens | training s |", "| --- | --- | --- |"]
    for name in ARMS:
      tokens, secs = reached.get(runs[(name, 0)].name) or (None, None)
      lines.append(f"| {name} | {_f(tokens, ',')} | {_f(secs, '.1f')} |")
  lines += ["", "## Plots (seed 0)", ""] + [f"![{p}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def _by_seqlen(steps) -> list[tuple[int, list[dict]]]:
  """Training rows grouped by sequence length, in order of length (step 0 has no ratio)."""
  groups = {}
  for row in steps[1:]:
    groups.setdefault(int(row["seqlen"]), []).append(row)
  return sorted(groups.items())


def analyse(study: Study, tuned, tune_result, results: str, command: str):
  runs = {(name, seed): report.read_run(study.workdir(name, seed))
          for name in ARMS for seed in range(study.seeds if name in HEADLINE else 1)}
  rows = {key: table_row(run) for key, run in runs.items()}
  first = [runs[(name, 0)] for name in ARMS]
  target, reached = report.time_to_target(first)
  out_dir = os.path.dirname(os.path.abspath(results))
  os.makedirs(out_dir, exist_ok=True)
  plots = report.plot(first, out_dir)
  seconds = tune_result["seconds"] + sum(_record(study.workdir(n, s))["seconds"]
                                         for n, s in runs)
  text = render(study, rows, runs, tuned, tune_result, target, reached, plots, command, seconds)
  with open(results, "w") as f:
    f.write(text)
  with open(os.path.join(study.out, "study.json"), "w") as f:
    json.dump({f"{name}_seed{seed}": row for (name, seed), row in rows.items()}, f, indent=1)
  return rows


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="example: "
                                   "python experiments/stability/run.py --smoke --out=/tmp/study")
  parser.add_argument("--out", default=os.path.join(REPO, "runs", "stability"),
                      help="Directory of the runs (reused when the study resumes).")
  parser.add_argument("--results", default=None, help="Markdown results file (default: "
                      "experiments/stability/RESULTS.md; --smoke: OUT/RESULTS.md).")
  parser.add_argument("--seeds", type=int, default=3, help="Seeds of the headline arms.")
  parser.add_argument("--smoke", action="store_true", help="A few steps per arm, 1 layer.")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="Override a regime field, e.g. --set optim.lr=0.01 (repeatable).")
  return parser.parse_args(argv)


def regime_config(args):
  overrides = dict(SMOKE if args.smoke else REGIME)
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      raise StudyError(f"--set {item!r} is invalid: use KEY=VALUE, e.g. --set optim.lr=0.01")
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
    return config_lib.validate(config_lib.load_config_file(path, overrides))
  except config_lib.ConfigError as error:
    raise StudyError(str(error)) from None


def study(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.seeds < 1:
    raise StudyError(f"--seeds={args.seeds} is invalid: must be >= 1")
  command = "python experiments/stability/run.py " + " ".join(
      sys.argv[1:] if argv is None else argv)
  c = regime_config(args)
  s = Study(c, args.out, SMOKE_SAFE_LR if args.smoke else SAFE_LR, args.seeds)
  results = args.results or (os.path.join(args.out, "RESULTS.md") if args.smoke else
                             os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "RESULTS.md"))
  run_arm(s.arm_config("baseline", 0), s.workdir("baseline", 0))
  print(f"baseline max loss ratio "
        f"{check_unstable(report.read_run(s.workdir('baseline', 0)), c):.3f}", flush=True)
  tune_result = tune.Tuner(c_for_tune(c), os.path.join(args.out, "tune")).run()
  tuned = (tune_result["seqlen_start"], tune_result["duration_steps"])
  for name in ARMS:
    for seed in range(args.seeds if name in HEADLINE else 1):
      run_arm(s.arm_config(name, seed, tuned), s.workdir(name, seed))
  return analyse(s, tuned, tune_result, results, command)


def c_for_tune(c):
  """The regime with SLW linear pacing, the config the tuner searches."""
  return config_lib.with_overrides(c, {"pacing.kind": "linear"})


def main():
  try:
    study()
  except (StudyError, tune.TuneError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except RuntimeError as error:  # trainer.StopTraining (imported only to train): e.g. an arm's
    trainer = sys.modules.get("slw_jax.trainer")  # workdir resumed under another regime.
    if trainer is None or not isinstance(error, trainer.StopTraining):
      raise
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
