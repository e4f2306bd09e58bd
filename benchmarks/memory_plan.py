"""Memory proof of the docs' launch commands and of remat, by `slw_jax.plan --memory`.

Each case AOT-compiles a paper config's largest bucket on N simulated CPU devices (a fresh
process per case, since the device count is fixed when JAX starts) and prints one JSON line,
then a markdown table for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/memory_plan.py [--only=readme|remat|head|fp32]
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, config, devices, overrides): the docs' launch commands with each config's defaults.
README = [
    ("gpt2_117m, one node x 8 GPUs", "gpt2_117m", 8, ["mesh.data=1", "mesh.fsdp=8"]),
    ("gpt2_1p5b, 2 nodes x 8 GPUs", "gpt2_1p5b", 16, ["mesh.data=2", "mesh.fsdp=8"]),
    ("gpt3_125m, TPU v5p-64 (32 chips)", "gpt3_125m", 32, ["mesh.data=1", "mesh.fsdp=-1"]),
    ("gpt2_117m, GKE 2 pods x 8 GPUs", "gpt2_117m", 16, []),
    ("tiny, local.sh 2 x 4 CPU devices", "tiny", 8,
     ["mesh.data=4", "mesh.tensor=2", "model.vocab_pad_multiple=8"]),
]
# The 2x target: gpt2_117m, one device, batch 64 x 1024, one microbatch.
REMAT = [(f"gpt2_117m 64x1024, remat={r}", "gpt2_117m", 1,
          ["batch_size=64", "optim.microbatches=1", f"model.remat={r}"])
         for r in ("none", "block", "dots")]
# The output head (issue 22): the whole float32 logits (full) against the fused head, no remat.
HEAD = [(f"gpt2_117m 64x1024, loss_head={h}, remat=none", "gpt2_117m", 1,
         ["batch_size=64", "optim.microbatches=1", "model.remat=none", f"model.loss_head={h}"])
        for h in ("full", "fused")]
# Before this change: float32, no microbatches (the docs/accelerators.md command needed ~137 GiB).
FP32 = [("gpt2_117m, 8 GPUs, float32, 1 microbatch (old defaults)", "gpt2_117m", 8,
         ["mesh.data=1", "mesh.fsdp=8", "model.dtype=float32", "optim.microbatches=1"])]


def run_case(name, config, devices, overrides):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "slw_jax.plan", f"--config=configs/{config}.py", "--memory",
             f"--devices={devices}", *(f"--config.{o}" for o in overrides)]
  start = time.perf_counter()
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  if result.returncode:
    return {"name": name, "error": result.stderr.strip().splitlines()[-1]}
  report = json.loads(result.stdout)
  report.update(name=name, wall_s=round(time.perf_counter() - start, 1))
  return report


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", choices=["readme", "remat", "head", "fp32"], default=None)
  parser.add_argument("--case", default="", help="Only cases whose name contains this.")
  args = parser.parse_args()
  groups = {"readme": README, "remat": REMAT, "head": HEAD, "fp32": FP32}
  rows = []
  for group, cases in groups.items():
    if args.only in (None, group):
      for case in (c for c in cases if args.case in c[0]):
        rows.append(run_case(*case))
        print(json.dumps(rows[-1]), flush=True)
  print("\n| case | devices | GiB/device | fits 80 GiB | microbatches | remat | dtype | "
        "compile s | wall s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    if "error" in r:
      print(f"| {r['name']} | error: {r['error']} |")
      continue
    print(f"| {r['name']} | {r['devices']} | {r['gib_per_device']:.2f} | {r['fits']} | "
          f"{r['microbatches']} | {r['remat']} | {r['dtype']} | {r['compile_s']} | "
          f"{r['wall_s']} |")


if __name__ == "__main__":
  main()
