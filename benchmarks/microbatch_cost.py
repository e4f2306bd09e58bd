"""Tokens/s of one train step split into K microbatches vs one pass, same global batch (CPU).

The issue's target: microbatches=4 costs no more than 10% tokens/s against microbatches=1 on
the small config (4 layers x 256, 4 heads, batch 16 x 256, float32, one CPU device). Rounds
alternate between the counts so that this VM's minute-to-minute drift hits both alike.

    .venv/bin/python benchmarks/microbatch_cost.py [--counts=1,4] [--rounds=5] [--steps=3]
"""

import argparse
import statistics
import time

import jax
import numpy as np

from slw_jax import config_lib, train_step

SMALL = {"model.n_layer": 4, "model.d_model": 256, "model.n_head": 4, "model.max_seqlen": 256,
         "batch_size": 16}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--counts", default="1,4")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  counts = [int(k) for k in args.counts.split(",")]
  c = config_lib.validate(config_lib.load_config_file("configs/tiny.py", SMALL))
  placed = train_step.on_mesh(c, jax.devices()[:1])
  device = train_step.sharded_steps(c, placed, skip_bad=False, background=False)
  shape = (16, 256)
  executables = {k: device.executables.compile_with(shape, k)[0] for k in counts}
  tokens = np.random.default_rng(0).integers(0, 259, (16, 257)).astype(np.int32)
  batch = placed.layout.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, 16)
  state = device.init()
  seconds = {k: [] for k in counts}
  for _ in range(args.rounds):
    for k in counts:
      state, metrics = executables[k](state, batch, np.float32(1e-4))  # Warm.
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = executables[k](state, batch, np.float32(1e-4))
      jax.block_until_ready(metrics)
      seconds[k].append((time.perf_counter() - start) / args.steps)
  base = statistics.median(seconds[counts[0]])
  print("| microbatches | step ms (median) | tokens/s | vs one pass |\n| --- | --- | --- | --- |")
  for k in counts:
    step = statistics.median(seconds[k])
    print(f"| {k} | {step * 1e3:.0f} | {shape[0] * shape[1] / step:,.0f} | "
          f"{base / step:.3f}x |")


if __name__ == "__main__":
  main()
