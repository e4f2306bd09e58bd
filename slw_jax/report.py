"""`python -m slw_jax.report DIR [DIR ...] --out=OUT`: plots and a Markdown report of runs.

Reads each run's `metrics.jsonl` (a run still going, or killed mid-write, is fine: a partial
last line is ignored), and its `eval/*.json` results when present. Writes PNG plots overlaying
the runs (the paper's Figures 1, 4, 5 and 6 for our runs) and `OUT/report.md`: per run the
stability statistics (Tables 1 and 3, recomputed from the metrics by the same monitor the
trainer uses) and the tokens and wall-clock each run took to reach the best validation loss all
runs reach (Table 2 style).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys

from absl import flags

from slw_jax import cli, config_lib, errors, monitor, wandb_log

_OUT = flags.DEFINE_string("out", None, "Output directory for the PNG plots and report.md.")
_WANDB = flags.DEFINE_bool("wandb", False, "Also log the plots to the W&B run of each run "
                           "directory that logged to one (its wandb_run.json).")
_RATIO = flags.DEFINE_float("ratio_threshold", 1.2, "Loss ratio above which a step counts as "
                            "unstable (the paper's 1.2).")


@dataclasses.dataclass
class Run:
  name: str
  workdir: str
  steps: list[dict]  # Training rows, in file order (a rollback repeats step numbers).
  evals: list[dict]  # Validation rows.
  results: dict  # eval/<task>.json contents by task.
  pacing: list[dict] = dataclasses.field(default_factory=list)  # Adaptive pacing's decisions.


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl; a partial last line (a run killed mid-write) is dropped."""
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):  # Last line, not newline-terminated: still being written.
        break
      raise errors.InputError(f"{path}:{number} is not a JSON object: {line[:80]!r}") from None
  return rows


def read_run(workdir: str, shown: str | None = None) -> Run:
  """The run in local directory `workdir`; `shown`: the name it was given (a URL, mirrored in
  `workdir`), which names it in the report."""
  shown = shown or workdir
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise errors.InputError(f"{shown!r} has no metrics.jsonl: pass run directories written by "
                            "python -m slw_jax.main --workdir=DIR")
  rows = [{k: _number(v) for k, v in row.items()} for row in read_metrics(path)]
  # Training time: the sum of step times, which (unlike an evaluation's elapsed_s) keeps
  # counting across a resume.
  wall, steps, evals = 0.0, [], []
  for row in rows:
    if "loss" in row:
      wall += row["step_time_s"]
      steps.append({**row, "train_time_s": wall})
    elif "val_loss" in row:
      evals.append({**row, "train_time_s": wall})
  results = {}
  for result in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
    try:
      with open(result) as f:
        results[os.path.splitext(os.path.basename(result))[0]] = json.load(f)
    except json.JSONDecodeError as error:
      raise errors.InputError(f"{result} is not valid JSON ({error})") from None
  name = os.path.basename(os.path.normpath(shown.split("://", 1)[-1]))
  return Run(name, shown, steps, evals, results, read_pacing_events(workdir))


def read_pacing_events(workdir: str) -> list[dict]:
  """The decisions of an adaptive run (events.jsonl rows of event "pacing"); [] otherwise."""
  path = os.path.join(workdir, "events.jsonl")
  if not os.path.isfile(path):
    return []
  return [e for e in read_metrics(path) if e.get("event") == "pacing"]


def _number(value):
  """The trainer writes non-finite numbers as the strings "nan" / "inf" / "-inf"."""
  return float(value) if value in ("nan", "inf", "-inf") else value


def stability(run: Run, ratio_threshold: float) -> dict:
  """The trainer's stability summary, recomputed by replaying the run's rows."""
  cfg = config_lib.base_config().monitor
  cfg.ratio_threshold = ratio_threshold
  replay = monitor.StabilityMonitor(cfg)
  for row in run.steps:
    replay.observe(row["step"], row)
  return replay.summary()


def time_to_target(runs: list[Run]) -> tuple[float | None, dict]:
  """The best validation loss every run reaches, and per run the first (tokens, training
  seconds) at which it does (None for a run without finite evaluations)."""
  finite = {r.name: [e for e in r.evals if math.isfinite(e["val_loss"])] for r in runs}
  bests = [min(e["val_loss"] for e in evals) for evals in finite.values() if evals]
  if not bests:
    return None, {}
  target = max(bests)
  reached = {}
  for run in runs:
    first = next((e for e in finite[run.name] if e["val_loss"] <= target), None)
    reached[run.name] = None if first is None else (first["tokens"], first["train_time_s"])
  return target, reached


def _series(rows, x, y):
  points = [(float(r[x]), float(r[y])) for r in rows if x in r and y in r]
  return [p[0] for p in points], [p[1] for p in points]


PLOTS = {  # file -> (title, [(x key, y key, y label, log y)], rows: "steps" or "evals")
    "loss_vs_tokens.png": ("Training loss", [("tokens", "loss", "loss", False)], "steps"),
    "loss_vs_time.png": ("Training loss vs training time (sum of step times, s)",
                         [("train_time_s", "loss", "loss", False)], "steps"),
    "loss_ratio.png": ("Loss ratio (loss / min previous loss)",
                       [("step", "loss_ratio", "loss ratio", False)], "steps"),
    "adam_variance.png": ("Adam variance state", [("step", "adam_nu_l1", "l1 norm of sqrt(nu)",
                                                   True),
                                                  ("step", "adam_nu_max", "max of sqrt(nu)",
                                                   True)], "steps"),
    "seqlen_lr.png": ("Pacing", [("step", "seqlen", "sequence length", False),
                                 ("step", "lr", "learning rate", False)], "steps"),
    "val_ppl.png": ("Validation perplexity", [("tokens", "val_ppl", "perplexity", True)],
                    "evals"),
}


def plot(runs: list[Run], out: str) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  written = []
  for filename, (title, panels, which) in PLOTS.items():
    figure, axes = pyplot.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for ax, (x, y, label, log) in zip(axes[:, 0], panels):
      for run in runs:
        xs, ys = _series(getattr(run, which), x, y)
        ax.plot(xs, ys, label=run.name, linewidth=1)
      ax.set_xlabel(x)
      ax.set_ylabel(label)
      if log:
        ax.set_yscale("log")
      ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out, filename), dpi=100)
    pyplot.close(figure)
    written.append(filename)
  return written


# Adaptive pacing: the length each step trained at, and the window signals of each decision.
PACING_PANELS = (("seqlen", "sequence length"), ("max_loss_ratio", "loss ratio (window max)"),
                 ("max_grad_norm_ratio", "grad norm / rolling median"),
                 ("max_nu_max_ratio", "adam_nu_max / rolling median"))


def plot_adaptive(runs: list[Run], out: str) -> list[str]:
  """adaptive_pacing.png for the runs with adaptive pacing decisions (none: no file)."""
  adaptive_runs = [r for r in runs if r.pacing]
  if not adaptive_runs:
    return []
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top  (plot() chose Agg)
  figure, axes = pyplot.subplots(len(PACING_PANELS), 1, figsize=(8, 2.6 * len(PACING_PANELS)),
                                 sharex=True)
  for ax, (key, label) in zip(axes, PACING_PANELS):
    for run in adaptive_runs:
      rows = run.steps if key == "seqlen" else run.pacing
      ax.plot(*_series(rows, "step", key), label=run.name, linewidth=1,
              marker=None if key == "seqlen" else ".")
    if key == "seqlen":  # Where each decision held or backed off.
      for run in adaptive_runs:
        held = [e for e in run.pacing if e["decision"] != "grow"]
        ax.scatter([e["step"] for e in held], [e["seqlen"] for e in held], marker="x", s=12)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_title("Adaptive pacing: length and the signals of each decision (x: hold/backoff)")
  axes[0].legend()
  axes[-1].set_xlabel("step")
  figure.tight_layout()
  figure.savefig(os.path.join(out, "adaptive_pacing.png"), dpi=100)
  pyplot.close(figure)
  return ["adaptive_pacing.png"]


def _fmt(value, spec: str = ".4g") -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return format(value, spec)


def _ratio(value, first) -> str:
  return "n/a" if value is None or not first else f"{value / first:.2f}x"


def markdown(runs: list[Run], stats: dict, target, reached, plots: list[str],
             ratio_threshold: float) -> str:
  lines = ["# Run report", "", f"Runs: {', '.join(f'`{r.workdir}`' for r in runs)}.", ""]
  for run in runs:
    numbers = sorted({r["step"] for r in run.steps})
    if numbers and len(numbers) < numbers[-1] - numbers[0] + 1:
      lines += [f"Note: {run.name} logged {len(numbers)} of steps {numbers[0]}-{numbers[-1]} "
                "(log.every_steps > 1): its statistics below use those steps only; its "
                "stability.json counts every step.", ""]
  lines += [
           f"## Stability (loss ratio > {ratio_threshold}: the paper's Tables 1 and 3)", "",
           "| run | steps | steps with ratio > threshold | % | max loss ratio | r (ratio vs "
           "adam_nu_l1) | p | r (ratio vs adam_nu_max) | p | SpikeScore |", "| --- " * 10 + "|"]
  for run in runs:
    s = stats[run.name]
    l1, mx = s["pearson_loss_ratio_vs_adam_nu_l1"], s["pearson_loss_ratio_vs_adam_nu_max"]
    lines.append(f"| {run.name} | {s['steps']} | {s['unstable_steps']} | "
                 f"{100 * s['unstable_fraction']:.2f} | {_fmt(s['max_loss_ratio'])} | "
                 f"{_fmt(l1['r'], '.3f')} | {_fmt(l1['p'], '.2g')} | {_fmt(mx['r'], '.3f')} | "
                 f"{_fmt(mx['p'], '.2g')} | {_fmt(s['spike_score'], '.4f')} |")
  lines += ["", "## Time to the best validation loss all runs reach (Table 2 style)", ""]
  if target is None:
    lines.append("No run has validation results yet.")
  else:
    first = reached.get(runs[0].name) or (None, None)
    lines += [f"Target: validation loss {target:.4f}.", "",
              "Training time: the sum of step times (compilation stalls included; evaluation "
              "and checkpoint time not; it keeps counting across a resume).", "",
              "| run | tokens | tokens vs first run | training s | training time vs first run |",
              "| --- | --- | --- | --- | --- |"]
    for run in runs:
      tokens, seconds = reached.get(run.name) or (None, None)
      lines.append(f"| {run.name} | {_fmt(tokens, ',')} | {_ratio(tokens, first[0])} | "
                   f"{_fmt(seconds, '.1f')} | {_ratio(seconds, first[1])} |")
  lines += ["", "## Final evaluation", ""]
  for run in runs:
    last = run.evals[-1] if run.evals else None
    summary = ("no validation yet" if last is None else
               f"step {last['step']}: val_loss {_fmt(last['val_loss'])}, "
               f"val_ppl {_fmt(last['val_ppl'])}")
    lines.append(f"- {run.name}: {summary}")
    for task, result in run.results.items():
      lines.append(f"  - {task}: {json.dumps(result, sort_keys=True)}")
  lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def build(workdirs: list[str], out: str, ratio_threshold: float = 1.2,
          wandb: bool = False, mirror_dir: str | None = None) -> str:
  """Writes the plots and report.md into `out`; returns the report's path. `wandb`: the plots
  also go to the W&B run of each workdir that logged to one (slw_jax.wandb_log). Workdirs and
  `out` may be URLs (gs://, s3://): runs are read through local mirrors (slw_jax.remote_run)."""
  from slw_jax import remote_run  # pylint: disable=g-import-not-at-top
  output = remote_run.Output(out)  # A bucket that cannot be written: before reading runs.
  local = [remote_run.open_for_reading(w, mirror_dir, None).local for w in workdirs]
  if wandb:
    _check_wandb_runs(local, workdirs)
  runs = [read_run(path, shown) for path, shown in zip(local, workdirs)]
  names = [r.name for r in runs]
  for run in runs:
    if names.count(run.name) > 1:
      run.name = run.workdir if errors.is_url(run.workdir) else os.path.normpath(
          run.workdir)  # Same basename: tell them apart by path.
  os.makedirs(output.local, exist_ok=True)
  stats = {r.name: stability(r, ratio_threshold) for r in runs}
  target, reached = time_to_target(runs)
  plots = plot(runs, output.local) + plot_adaptive(runs, output.local)
  with open(os.path.join(output.local, "report.md"), "w") as f:
    f.write(markdown(runs, stats, target, reached, plots, ratio_threshold))
  for workdir in local if wandb else ():
    wandb_log.log_plots(workdir, output.local, plots)
  output.upload()
  return f"{out.rstrip('/')}/report.md" if output.url else os.path.join(out, "report.md")


def _check_wandb_runs(local: list[str], workdirs: list[str]):
  if not wandb_log.installed():
    raise errors.UsageError("--wandb needs the wandb package, which is not installed: pip "
                            f"install {wandb_log.PACKAGE}")
  if not any(os.path.isfile(os.path.join(w, wandb_log.RUN_FILE)) for w in local):
    raise errors.UsageError(f"--wandb: none of {', '.join(workdirs)} logged to W&B (no "
                            f"{wandb_log.RUN_FILE}; set log.wandb_project when training)")


USAGE = "python -m slw_jax.report DIR [DIR ...] --out=OUT [--flag=value ...]"
EXAMPLE = "python -m slw_jax.report runs/slw runs/baseline --out=reports/slw_vs_baseline"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.MIRROR_DIR,), usage=USAGE)
  with cli.exit_on_bad_input():
    workdirs = cli.parse_flags(argv)[1:]
    if not workdirs:
      raise errors.UsageError("pass one or more run directories: python -m slw_jax.report DIR "
                              "[DIR ...] --out=OUT")
    if not _OUT.value:
      raise errors.UsageError("--out is required: the directory for the plots and report.md")
    if _RATIO.value <= 1:
      raise errors.UsageError(f"--ratio_threshold={_RATIO.value} must be > 1")
    path = build(workdirs, _OUT.value, _RATIO.value, _WANDB.value,  # Reads every run first.
                 cli.MIRROR_DIR.value)
  print(f"wrote {path} and {len(PLOTS)} plots in {_OUT.value}")


if __name__ == "__main__":
  main()
