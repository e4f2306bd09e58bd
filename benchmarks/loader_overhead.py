"""Loader cost against the tiny config's step time (target: under 2%).

Measures, on the prepared default corpus:
  1. the time to build one batch (no prefetch) at several bucket shapes;
  2. the time of the trainer's jitted training step of the tiny model at the same shapes;
  3. over the first steps of the tiny run, the time the training loop waits for the next batch
     when the loader prefetches in its background thread (`data.prefetch`).

Usage: .venv/bin/python benchmarks/loader_overhead.py [--steps=200]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from slw_jax import config_lib, input_pipeline, optim, pacing, train_step


def make_step(config):
  """The trainer's own step (train_step.make_train_step), jitted without donation so the
  same state can be timed repeatedly."""
  optimizer = optim.make_optimizer(config.optim)
  graphdef, _ = train_step.build_model(config)
  state = jax.jit(train_step.make_init_fn(config, optimizer))()
  step_fn = jax.jit(train_step.make_train_step(config, graphdef, optimizer, False))

  def step(state, inputs, targets):
    state, metrics = step_fn(state, {"inputs": inputs, "targets": targets}, jnp.float32(1e-4))
    return state, metrics["loss"]

  return step, state


def timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  config = config_lib.validate(config_lib.load_config_file("configs/tiny.py"))
  loader, _ = input_pipeline.open_training_data(config)
  step, state = make_step(config)
  print(f"{'shape':>10} {'batch build ms':>15} {'step ms':>9} {'build/step':>10}")
  for seqlen in (16, 64, 128, 256):
    b = loader.batch_at(0, config.batch_size, seqlen)
    step(state, b.inputs, b.targets)[1].block_until_ready()  # Compile.
    build = timed(lambda: loader.batch_at(12345, config.batch_size, seqlen), 50)
    run = timed(lambda: step(state, b.inputs, b.targets)[1].block_until_ready(), 20)
    print(f"{config.batch_size:>4}x{seqlen:<5} {build * 1e3:15.3f} {run * 1e3:9.2f} "
          f"{build / run:10.2%}")

  schedule = pacing.run_schedule(config)
  shapes = [(int(schedule.batch_size[t]), int(schedule.seqlen[t])) for t in range(args.steps)]
  for _, seqlen in sorted(set(shapes)):  # Compile every shape first: measure waits, not XLA.
    b = loader.batch_at(0, config.batch_size, seqlen)
    step(state, b.inputs, b.targets)[1].block_until_ready()
  waited, start = 0.0, time.perf_counter()
  batches = loader.prefetch(iter(shapes), depth=config.data.prefetch)
  for _ in shapes:
    before = time.perf_counter()
    batch = next(batches)
    waited += time.perf_counter() - before
    state, loss = step(state, batch.inputs, batch.targets)
    loss.block_until_ready()
  total = time.perf_counter() - start
  print(f"first {args.steps} steps of the tiny run with prefetch={config.data.prefetch}: "
        f"{total:.2f} s, waited on the loader {waited * 1e3:.1f} ms = {waited / total:.2%}")


if __name__ == "__main__":
  main()
