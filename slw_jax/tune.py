"""The paper's low-cost SLW tuner (Sec. 4): `python -m slw_jax.tune --config=... --workdir=DIR`.

1. Start with `seqlen_start` = the smallest allowed (`pacing.multiple`; the paper's 8) and
   T = `tune.first_duration_warmups` LR-warmup lengths. Raise `seqlen_start` through
   `tune.seqlen_starts` until the validation perplexity of a trial of the first
   `tune.start_window_warmups` warmup lengths no longer fluctuates.
2. With that start, bisect for the largest T (up to `tune.max_duration_warmups` warmup lengths)
   whose trial of the first `tune.window_warmups` warmup lengths shows no fluctuation.

Each trial is the config's own run (its LR schedule over the full token budget included),
stopped after its window, evaluated `tune.evals_per_warmup` times per warmup length on the same
`tune.eval_batches` validation batches. A fluctuation (`fluctuation`) is a validation
perplexity above the lowest one before it by more than `tune.rise_tolerance` (relative): on
fixed batches a healthy early curve only falls, so any rise is the model getting worse (a
spike, or a drift up). Before the first trial, the tuner bounds the tokens of every trial it
could run and refuses a plan above `tune.max_cost_fraction` of the full run.

Trials live in DIR/trials/; DIR/tune_state.json records each finished one, so an interrupted
tuner resumes where it stopped (an unfinished trial resumes from its own checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from slw_jax import cli, config_diff, config_lib, errors, pacing, report, run_log

STATE_FILE = "tune_state.json"
# Fields a tuner directory may differ in from the config that started it: what it tunes, and
# the knobs of how trials are judged and logged.
# (Not the pacing: with token warmup it sets the warmup's length in steps, the tuner's unit.)
FREE_FIELDS = ("tune.max_cost_fraction", "log.print_every_steps", "compile.threads",
               "compile.cache_dir")


class TuneError(errors.ConfigError):
  """A tuning request that cannot run as asked (one line: what and what is allowed)."""


@dataclasses.dataclass(frozen=True)
class Fluctuation:
  fluctuates: bool
  max_rise: float  # Largest relative rise of perplexity over the lowest one before it.
  at: int | None  # Index of the first point above the tolerance.


def fluctuation(val_losses, tolerance: float) -> Fluctuation:
  """Whether a validation curve (losses in nats, in order) fluctuates: some perplexity is above
  the lowest perplexity before it by more than `tolerance`, relative. Non-finite losses count
  as fluctuations."""
  best, max_rise, at = math.inf, 0.0, None
  for index, loss in enumerate(val_losses):
    if not math.isfinite(loss):
      return Fluctuation(True, math.inf, index if at is None else at)
    if best < math.inf:
      rise = math.exp(min(loss - best, 700.0)) - 1.0
      max_rise = max(max_rise, rise)
      if rise > tolerance and at is None:
        at = index
    best = min(best, loss)
  return Fluctuation(at is not None, max_rise, at)


@dataclasses.dataclass(frozen=True)
class Trial:
  """One trial's settings: a start length, a duration T and how many steps it runs."""
  seqlen_start: int
  duration_steps: int
  window_steps: int

  @property
  def name(self) -> str:
    return f"s{self.seqlen_start}_T{self.duration_steps}_w{self.window_steps}"


def warmup_steps(c) -> int:
  """The config's LR warmup length in steps (token warmup: the steps its tokens take)."""
  steps = pacing.warmup_end(c).step
  if steps < 1:
    raise TuneError(f"config.optim.warmup_steps={c.optim.warmup_steps} and optim.warmup_tokens="
                    f"{c.optim.warmup_tokens} are invalid for tune: its trial windows and "
                    "durations are multiples of the LR warmup, so set one of them")
  return steps


def seqlen_starts(c) -> list[int]:
  """The starts tried in order: tune.seqlen_starts, or pacing.multiple x 1, 2, 4, 8, 16."""
  if c.tune.seqlen_starts:
    return list(c.tune.seqlen_starts)
  m, end = c.pacing.multiple, c.pacing.seqlen_end
  return [m * k for k in (1, 2, 4, 8, 16) if m * k <= end]


def trial_config(c, trial: Trial):
  """The config of one trial: the run's own config with this start and T, stopped after the
  window, evaluated on fixed batches at even points, checkpointed twice."""
  t, warmup = c.tune, warmup_steps(c)
  every = max(1, round(warmup / t.evals_per_warmup))
  return config_lib.with_overrides(c, {
      "pacing.seqlen_start": trial.seqlen_start, "pacing.duration_steps": trial.duration_steps,
      "train_steps": trial.window_steps, "eval.every_steps": every,
      "eval.batches": t.eval_batches, "checkpoint.every_steps": max(1, trial.window_steps // 2),
      "monitor.action": "log"})


def trial_tokens(c, trial: Trial) -> int:
  """Tokens a trial consumes (from its schedule; nothing runs)."""
  return int(pacing.run_schedule(trial_config(c, trial)).total_tokens)


def _window(c, warmups: float) -> int:
  return max(2, round(warmups * warmup_steps(c)))


def start_trials(c) -> list[Trial]:
  """Step 1's trials, in order: each start at the first T, over the start window."""
  first = duration_range(c)[0]
  return [Trial(s, first, _window(c, c.tune.start_window_warmups)) for s in seqlen_starts(c)]


def duration_range(c) -> tuple[int, int]:
  """The shortest and longest T the search tries, in steps."""
  warmup = warmup_steps(c)
  return c.tune.first_duration_warmups * warmup, c.tune.max_duration_warmups * warmup


def cost_bound(c) -> int:
  """An upper bound on the tokens of all trials: every start, then the T search's two ends and
  `search_trials` bisection points, each costing at most the largest T-trial of any start
  (a longer T means shorter sequences early, so it bounds from the shortest T)."""
  starts, window = start_trials(c), _window(c, c.tune.window_warmups)
  shortest = duration_range(c)[0]
  per_search_trial = max(trial_tokens(c, Trial(s.seqlen_start, shortest, window))
                         for s in starts)
  return (sum(trial_tokens(c, s) for s in starts)
          + (2 + c.tune.search_trials) * per_search_trial)


class Tuner:
  """Runs the strategy in `workdir`, resuming from its state file."""

  def __init__(self, c, workdir: str, log=print):
    self.c, self.workdir, self.log = c, workdir, log
    if c.pacing.kind not in ("linear", "root"):
      raise TuneError(f"config.pacing.kind={c.pacing.kind!r} is invalid for tune: it tunes the "
                      "start and duration of linear or root pacing"
                      + (" (adaptive pacing decides its lengths online: it has nothing to "
                         "tune)" if c.pacing.kind == "adaptive" else ""))
    self.warmup = warmup_steps(c)
    self.run_tokens = int(pacing.run_schedule(c).total_tokens)
    self.bound = cost_bound(c)
    if self.bound > c.tune.max_cost_fraction * self.run_tokens:
      raise TuneError(
          f"config.tune.max_cost_fraction={c.tune.max_cost_fraction} is exceeded: the trials "
          f"could take {self.bound:,} tokens, {self.bound / self.run_tokens:.1%} of the run's "
          f"{self.run_tokens:,}; shorten tune.window_warmups or tune.start_window_warmups, try "
          "fewer tune.seqlen_starts or tune.search_trials, or raise tune.max_cost_fraction")
    self.done = self._load_state()

  # ----- state -------------------------------------------------------------------------------

  def _fingerprint(self) -> dict:
    return {k: v for k, v in config_diff.flatten(self.c.to_dict()).items() if k not in FREE_FIELDS}

  def _load_state(self) -> dict:
    path = os.path.join(self.workdir, STATE_FILE)
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      state = json.load(f)
    changed = config_diff.first_difference(state["config"], self._fingerprint())
    if changed:
      raise TuneError(f"--workdir={self.workdir} holds a tuner run of another config "
                      f"({changed}): use a new --workdir or the same config")
    return {row["name"]: row for row in state["trials"]}

  def _save_state(self):
    state = {"config": self._fingerprint(), "trials": list(self.done.values())}
    run_log.write_json(os.path.join(self.workdir, STATE_FILE), state)

  # ----- trials ------------------------------------------------------------------------------

  def judge(self, trial: Trial) -> dict:
    """The trial's row (runs it unless a finished run is recorded)."""
    if trial.name in self.done:
      return self.done[trial.name]
    from slw_jax import trainer  # pylint: disable=g-import-not-at-top  (JAX only when needed)
    config = trial_config(self.c, trial)
    self.log(f"trial {trial.name}: seqlen_start {trial.seqlen_start}, T {trial.duration_steps} "
             f"steps, first {trial.window_steps} steps")
    started, workdir = time.time(), os.path.join(self.workdir, "trials", trial.name)
    try:
      summary = trainer.Trainer(config, workdir).run()
      diverged = None
    except trainer.BadStepsStop as error:  # Diverged: the most fluctuating trial there is.
      summary, diverged = {"completed": True, "tokens": _trained_tokens(workdir)}, str(error)
    if not summary["completed"]:
      raise KeyboardInterrupt(f"trial {trial.name} stopped by {summary['stopped_by']}")
    curve = _val_curve(workdir)
    verdict = fluctuation([loss for _, loss in curve], self.c.tune.rise_tolerance)
    rise = verdict.max_rise if math.isfinite(verdict.max_rise) else None  # None: not finite.
    row = {**dataclasses.asdict(trial), "name": trial.name, "tokens": summary["tokens"],
           "seconds": round(time.time() - started, 1),
           "fluctuates": verdict.fluctuates or diverged is not None, "max_rise": rise,
           "at_step": None if verdict.at is None else curve[verdict.at][0],
           "diverged": diverged, "val_curve": curve}
    self.done[trial.name] = row
    self._save_state()
    self.log(f"trial {trial.name}: {_verdict(row)}, {row['tokens']:,} tokens, "
             f"{row['seconds']:.0f} s")
    return row

  def choose_start(self) -> int:
    trials = start_trials(self.c)
    for trial in trials:
      if not self.judge(trial)["fluctuates"]:
        return trial.seqlen_start
    largest = trials[-1].seqlen_start
    self.log(f"every start fluctuates at the beginning; taking the largest, {largest}")
    return largest

  def choose_duration(self, start: int) -> int:
    """The largest T in [first, max] warmup lengths whose window is steady (bisection)."""
    t, window = self.c.tune, _window(self.c, self.c.tune.window_warmups)
    steady = lambda T: not self.judge(Trial(start, T, window))["fluctuates"]  # noqa: E731
    low, high = duration_range(self.c)
    if not steady(low):
      self.log(f"T={low} already fluctuates; taking it, the shortest T the search allows")
      return low
    if high == low or steady(high):
      self.log(f"T={high} (tune.max_duration_warmups) is steady: taking the search's upper end "
               "(raise tune.max_duration_warmups to search further)")
      return high
    for _ in range(t.search_trials):
      if high - low <= 1:
        break
      middle = (low + high) // 2
      low, high = (middle, high) if steady(middle) else (low, middle)
    return low

  def run(self) -> dict:
    start = self.choose_start()
    duration = self.choose_duration(start)
    rows = list(self.done.values())
    tokens = sum(r["tokens"] for r in rows)
    result = {"seqlen_start": start, "duration_steps": duration,
              "flags": f"--config.pacing.seqlen_start={start} "
                       f"--config.pacing.duration_steps={duration}",
              "trials": rows, "tokens": tokens, "seconds": sum(r["seconds"] for r in rows),
              "run_tokens": self.run_tokens, "cost_fraction": tokens / self.run_tokens,
              "cost_bound_tokens": self.bound}
    run_log.write_json(os.path.join(self.workdir, "tune_result.json"), result)
    with open(os.path.join(self.workdir, "tune.md"), "w") as f:
      f.write(render(result))
    return result


def _verdict(row: dict) -> str:
  if row.get("diverged"):  # (Rows of an older tuner have no such key.)
    return "diverged (monitor.max_bad_in_a_row)"
  rise = "not finite" if row["max_rise"] is None else f"{row['max_rise']:.1%}"
  if row["fluctuates"]:
    return f"fluctuates (step {row['at_step']}, rise {rise})"
  return f"steady (max rise {rise})"


def _trained_tokens(workdir: str) -> int:
  """Tokens through the last logged step of a trial that stopped early."""
  rows = [r for r in _metric_rows(workdir) if "loss" in r]
  return int(rows[-1]["tokens"] + rows[-1]["seqlen"] * rows[-1]["batch_size"]) if rows else 0


def _metric_rows(workdir: str) -> list[dict]:
  return report.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _val_curve(workdir: str) -> list[tuple[int, float]]:
  """(step, val_loss) of a trial's evaluations, in order (the last per step if resumed)."""
  points = {r["step"]: float(r["val_loss"]) for r in _metric_rows(workdir) if "val_loss" in r}
  return sorted(points.items())


def render(result: dict) -> str:
  """The trials table and the choice, as markdown."""
  lines = ["| trial | seqlen_start | T | steps | verdict | tokens | seconds |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["trials"]:
    lines.append(f"| {r['name']} | {r['seqlen_start']} | {r['duration_steps']} | "
                 f"{r['window_steps']} | {_verdict(r)} | {r['tokens']:,} | {r['seconds']:.0f} |")
  lines += ["", f"Chosen: `{result['flags']}`", "",
            f"Cost: {result['tokens']:,} tokens = {result['cost_fraction']:.2%} of the run's "
            f"{result['run_tokens']:,}, {result['seconds']:.0f} s."]
  return "\n".join(lines) + "\n"


def _close_quietly(run_dir, exit_status: int | None = None):
  """Copies what the tuner left to its bucket (a URL --workdir); a failure is one line (and
  exits with `exit_status`, if given)."""
  try:
    run_dir.close()
  except errors.StopTraining as failure:
    print(f"error: {failure}", file=sys.stderr)
    if exit_status is not None:
      sys.exit(exit_status)


EXAMPLE = "python -m slw_jax.tune --config=configs/tiny.py --workdir=runs/tune_tiny"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.CONFIG, cli.WORKDIR, cli.MIRROR_DIR))
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not cli.WORKDIR.value:
      raise errors.UsageError("--workdir is required: the tuner's directory, e.g. "
                              "--workdir=runs/tune_tiny")
    from slw_jax import hardware, remote_run  # pylint: disable=g-import-not-at-top
    hardware.use_gpu_memory_fraction()
    cli.writable_directory(cli.WORKDIR.value)
    run_dir = remote_run.open_run(cli.WORKDIR.value, cli.MIRROR_DIR.value)  # A URL: mirrored.
    os.makedirs(run_dir.local, exist_ok=True)
    tuner = Tuner(config, run_dir.local)
  print(f"tune: trials cost at most {tuner.bound:,} tokens "
        f"({tuner.bound / tuner.run_tokens:.1%} of the run)", flush=True)
  run_dir.sync_in_background(config.checkpoint.upload_every_s)
  try:
    with cli.exit_on_bad_input():  # A trial's own setup errors (memory check, data): one line.
      result = tuner.run()
  except errors.StopTraining as error:
    print(f"error: {error}", file=sys.stderr)
    _close_quietly(run_dir)
    sys.exit(1)
  except KeyboardInterrupt:
    print("tune: interrupted; rerun the same command to resume", file=sys.stderr)
    _close_quietly(run_dir)
    sys.exit(130)
  except SystemExit:  # Bad input in a trial (exit_on_bad_input): what the others left, kept.
    _close_quietly(run_dir)
    raise
  _close_quietly(run_dir, exit_status=1)  # A URL: every trial and the result in the bucket.
  print(render(result))
  print(f"paste: {result['flags']}")


if __name__ == "__main__":
  main()
