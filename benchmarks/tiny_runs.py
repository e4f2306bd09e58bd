"""Full tiny runs: compile stall with and without background compilation, and SLW against the
fixed-length baseline (wall-clock and tokens to the same validation loss).

Each run trains configs/tiny.py end to end in a fresh temporary workdir with the persistent
compilation cache off, so every bucket really compiles.

Usage: .venv/bin/python benchmarks/tiny_runs.py [--only=stall|slw] [--background=true,false]
    [--set=compile.pad_multiple=128 --set=pacing.kind=adaptive ...]   (--set: config overrides
    of every stall run)
"""

import argparse
import json
import os
import tempfile

from slw_jax import config_lib, trainer


def run(overrides: dict) -> tuple[dict, list[dict]]:
  values = {"compile.cache_dir": "", "log.print_every_steps": 100, **overrides}
  c = config_lib.validate(config_lib.load_config_file("configs/tiny.py", values))
  with tempfile.TemporaryDirectory() as workdir:
    summary = trainer.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      evals = [r for r in map(json.loads, f) if "val_loss" in r]
  return summary, evals


def stall(backgrounds=(True, False), overrides=None):
  print("| compile.background | overrides | compile stall (total) | stall after step 0 | wall "
        "time | buckets |")
  print("| --- | --- | --- | --- | --- | --- |")
  for background in backgrounds:
    summary, _ = run({"compile.background": background, **(overrides or {})})
    wall = summary["wall_time_s"]
    print(f"| {background} | {overrides or '-'} | {summary['compile_stall_s']:.1f} s "
          f"({summary['compile_stall_s'] / wall:.1%}) | "
          f"{summary['compile_stall_after_step0_s']:.1f} s "
          f"({summary['compile_stall_after_step0_s'] / wall:.1%}) | {wall:.1f} s | "
          f"{len(summary['buckets'])} |", flush=True)


def first_reaching(evals, target):
  return next(e for e in evals if e["val_loss"] <= target)


def slw_vs_baseline():
  runs = {"SLW (linear 32 -> 256, T=150)": {},
          "baseline (pacing.kind=none)": {"pacing.kind": "none"}}
  results = {name: run({"eval.every_steps": 20, **o}) for name, o in runs.items()}
  target = max(min(e["val_loss"] for e in evals) for _, evals in results.values())
  print(f"target: the best validation loss both runs reach = {target:.4f}")
  print("| run | steps | final val loss | tokens to target | wall to target | total wall |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, (summary, evals) in results.items():
    hit = first_reaching(evals, target)
    print(f"| {name} | {summary['steps']} | {summary['final_val_loss']:.4f} | "
          f"{hit['tokens']:,} | {hit['elapsed_s']:.1f} s | {summary['wall_time_s']:.1f} s |")


def _value(text: str):
  """A --set value: JSON (numbers, true/false, lists), else the string itself (adaptive)."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", choices=["stall", "slw"], default=None)
  parser.add_argument("--background", default="true,false")
  parser.add_argument("--set", action="append", default=[], help="key=value config override")
  args = parser.parse_args()
  only = args.only
  sets = dict(item.split("=", 1) for item in args.set)
  if only in (None, "stall"):
    stall([b == "true" for b in args.background.split(",")],
          {k: _value(v) for k, v in sets.items()})
  if only in (None, "slw"):
    slw_vs_baseline()
