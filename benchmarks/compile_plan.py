"""Summed compile time of each paper config's plan against its training time, with and without
the recommended `compile.pad_multiple` (issue 12; target: below 1% with the recommendation).

Each case is `python -m slw_jax.plan --compile_estimate` in a fresh process, on the docs' launch
commands' device count and mesh: compile seconds measured by AOT-compiling the shortest and the
longest bucket on simulated CPU devices, training time at the paper's own throughput (its Tables
2 and 4: the SLW runs' tokens over their wall-clock hours on 128 V100s).

    .venv/bin/python benchmarks/compile_plan.py [--only=gpt2_117m,...]
"""

import argparse
import json
import os
import subprocess
import sys

# (config, devices, overrides, paper tokens/s and where it comes from). Microbatches are the
# counts `auto` picks on 80 GB (benchmarks/RESULTS.md, memory of the launch commands), fixed
# so that each measurement is one compile per bucket.
CASES = [
    ("gpt2_117m", 8, ["mesh.data=1", "mesh.fsdp=8", "optim.microbatches=4"],
     157e9 / (33 * 3600), "Table 2 case 3: 157B tokens in 33 h"),
    ("gpt2_1p5b", 16, ["mesh.data=2", "mesh.fsdp=8", "optim.microbatches=1"],
     157e9 / (364 * 3600), "Table 2 case 12: 157B tokens in 364 h"),
    ("gpt3_125m", 32, ["mesh.data=1", "mesh.fsdp=-1", "optim.microbatches=8"],
     30e9 / (4 * 3600), "Table 4 case 4: 30B tokens in 4 h"),
]


def estimate(config, devices, overrides, tokens_per_s) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # compile.threads=4: the trainer's default on a host of 8 or more cores (every GPU and TPU
  # host of the launch commands in docs/); it sets how much compiling overlaps training.
  command = [sys.executable, "-m", "slw_jax.plan", f"--config=configs/{config}.py",
             "--compile_estimate", f"--devices={devices}", f"--tokens_per_s={tokens_per_s}",
             "--config.compile.threads=4", *(f"--config.{o}" for o in overrides)]
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", default="")
  only = set(filter(None, parser.parse_args().only.split(",")))
  print("| config | devices | paper rate | compile s/bucket (short, long) | no padding: buckets, "
        "compile s, share, stall | recommended M: buckets, compile s, share, padding, stall |")
  print("| --- | --- | --- | --- | --- | --- |")
  for config, devices, overrides, rate, source in CASES:
    if only and config not in only:
      continue
    report = estimate(config, devices, overrides, rate)
    print(json.dumps(report), file=sys.stderr, flush=True)
    none, best = report["configured"], report["recommended"]
    measured = report["assumptions"]["compile_s"].split(": ", 1)[1]
    print(f"| `{config}` | {devices} | {rate:,.0f} tok/s ({source}) | {measured} | "
          f"{none['buckets']}, {none['compile_s']:,.0f}, {none['compile_share']:.2%}, "
          f"{none['stall_s']:,.0f} s ({none['stall_share']:.2%}) | "
          f"{best['pad_multiple']}: {best['buckets']}, {best['compile_s']:,.0f}, "
          f"{best['compile_share']:.2%}, {best['padding_fraction']:.2%}, "
          f"{best['stall_s']:,.0f} s ({best['stall_share']:.2%}) |", flush=True)


if __name__ == "__main__":
  main()
