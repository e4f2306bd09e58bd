"""Adaptive pacing's cost per step: tokens/s against linear pacing at equal lengths.

The controller decides from the metric rows the trainer already fetches for its log (one step
behind the device), so it should add no host sync; this measures that claim. Each pacing runs
configs/tiny.py end to end `--repeats` times, interleaved (linear, adaptive, linear, ...) so a
drift of the machine hits both alike; steps are compared length by length: the median
tokens/s of each sequence length both ran for at least `--min_steps` steps (the first step at
each length, which may wait on a compile, and every step after an evaluation or a save left
out), then the mean over lengths of adaptive / linear, weighted by the steps adaptive spent
there.

Then the host work a decision adds, timed alone: Controller.observe per step and the schedule
redrawn per length change, for the tiny and the GPT-2 117M config.

Usage: .venv/bin/python benchmarks/adaptive_overhead.py [--repeats=2] [--min_steps=10]
    [--set=KEY=VALUE ...] [--host_only]   (--set: config overrides of both)
"""

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slw_jax import config_lib, trainer  # noqa: E402

PACINGS = {"linear": {}, "adaptive": {"pacing.kind": "adaptive"}}


def step_rates(overrides: dict) -> dict[int, list[float]]:
  """tokens/s of each step by sequence length, from one run (compile cache on: warm)."""
  c = config_lib.validate(config_lib.load_config_file("configs/tiny.py", {
      "log.print_every_steps": 10**6, **overrides}))
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [r for r in map(json.loads, f) if "loss" in r]
  rates, seen = collections.defaultdict(list), set()
  periodic = {c.eval.every_steps, c.checkpoint.every_steps}
  for row in rows:
    first_at_length = row["seqlen"] not in seen
    seen.add(row["seqlen"])
    after_periodic = any(row["step"] % every == 0 for every in periodic)
    if not first_at_length and not after_periodic:
      rates[row["seqlen"]].append(row["tokens_per_s"])
  return rates


def compare(runs: dict[str, list[dict]], min_steps: int) -> list[tuple]:
  """(seqlen, linear median, adaptive median, ratio, adaptive steps) per common length."""
  pooled = {name: collections.defaultdict(list) for name in runs}
  for name, repeats in runs.items():
    for rates in repeats:
      for seqlen, values in rates.items():
        pooled[name][seqlen] += values
  rows = []
  for seqlen in sorted(set(pooled["linear"]) & set(pooled["adaptive"])):
    a, b = pooled["linear"][seqlen], pooled["adaptive"][seqlen]
    if min(len(a), len(b)) >= min_steps:
      la, ad = statistics.median(a), statistics.median(b)
      rows.append((seqlen, la, ad, ad / la, len(b)))
  return rows


def host_costs(configs=("configs/tiny.py", "configs/gpt2_117m.py")) -> list[tuple]:
  """(config, microseconds per Controller.observe, milliseconds per redraw of the schedule):
  the host work a decision adds, timed alone (no device involved)."""
  from slw_jax import adaptive, pacing  # pylint: disable=g-import-not-at-top
  rows = []
  for path in configs:
    c = config_lib.validate(config_lib.load_config_file(path, {"pacing.kind": "adaptive"}))
    controller = adaptive.Controller(c)
    row = {"seqlen": pacing.ladder(c)[0], "loss": 3.0, "loss_ratio": 1.0, "grad_norm": 1.0,
           "adam_nu_max": 0.01}
    start = time.perf_counter()
    for step in range(20_000):
      controller.observe(step, {**row, "grad_norm": 1.0 + (step % 7) / 10})
    observe_us = (time.perf_counter() - start) / 20_000 * 1e6
    changes = pacing.fastest_changes(c)[:4]
    start = time.perf_counter()
    for _ in range(5):
      pacing.run_schedule(c, changes)
    rows.append((path, observe_us, (time.perf_counter() - start) / 5 * 1e3))
  return rows


def print_rates(args):
  overrides = {}
  for item in args.set:
    key, _, value = item.partition("=")
    try:
      overrides[key] = json.loads(value)
    except json.JSONDecodeError:
      overrides[key] = value
  runs = {name: [] for name in PACINGS}
  for _ in range(args.repeats):
    for name, pacing in PACINGS.items():
      runs[name].append(step_rates({**overrides, **pacing}))
  rows = compare(runs, args.min_steps)
  print("| seqlen | linear tokens/s (median) | adaptive tokens/s (median) | adaptive / linear "
        "| adaptive steps |")
  print("| --- | --- | --- | --- | --- |")
  for seqlen, la, ad, ratio, steps in rows:
    print(f"| {seqlen} | {la:,.0f} | {ad:,.0f} | {ratio:.3f} | {steps} |")
  total = sum(r[4] for r in rows)
  weighted = sum(r[3] * r[4] for r in rows) / total if total else float("nan")
  print(f"\nweighted adaptive / linear: {weighted:.4f} over {total} adaptive steps at "
        f"{len(rows)} lengths ({args.repeats} runs of each, interleaved)\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--min_steps", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--host_only", action="store_true", help="Only the host-cost table.")
  args = parser.parse_args()
  if not args.host_only:
    print_rates(args)
  print("| config | Controller.observe per step | schedule redrawn per change |")
  print("| --- | --- | --- |")
  for path, observe_us, replan_ms in host_costs():
    print(f"| {path} | {observe_us:.1f} us | {replan_ms:.1f} ms |")


if __name__ == "__main__":
  main()
