"""Loader cost against the tiny config's step time (target: under 2%).

Measures, on the prepared default corpus:
  1. the time to build one batch (no prefetch) at several bucket shapes;
  2. the time of a jitted training step of the tiny model (forward, backward, clipped AdamW)
     at the same shapes: a stand-in for the trainer's step until the trainer lands;
  3. over the first steps of the tiny run, the time the training loop waits for the next batch
     when the loader prefetches in its background thread (`data.prefetch`).

Usage: .venv/bin/python benchmarks/loader_overhead.py [--steps=200]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from slw_jax import config_lib, input_pipeline, models, pacing, schedules


def make_step(config):
  model = models.GPT(models.GPTConfig.from_config(config.model), nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = schedules.make_optimizer(config.optim)

  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params, rest)(inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, params, optimizer.init(params)


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
  step, params, opt_state = make_step(config)
  print(f"{'shape':>10} {'batch build ms':>15} {'step ms':>9} {'build/step':>10}")
  for seqlen in (16, 64, 128, 256):
    b = loader.batch_at(0, config.batch_size, seqlen)
    step(params, opt_state, b.inputs, b.targets)[2].block_until_ready()  # Compile.
    build = timed(lambda: loader.batch_at(12345, config.batch_size, seqlen), 50)
    run = timed(lambda: step(params, opt_state, b.inputs, b.targets)[2].block_until_ready(), 20)
    print(f"{config.batch_size:>4}x{seqlen:<5} {build * 1e3:15.3f} {run * 1e3:9.2f} "
          f"{build / run:10.2%}")

  schedule = pacing.run_schedule(config)
  shapes = [(int(schedule.batch_size[t]), int(schedule.seqlen[t])) for t in range(args.steps)]
  for _, seqlen in sorted(set(shapes)):  # Compile every shape first: measure waits, not XLA.
    b = loader.batch_at(0, config.batch_size, seqlen)
    step(params, opt_state, b.inputs, b.targets)[2].block_until_ready()
  waited, start = 0.0, time.perf_counter()
  batches = loader.prefetch(iter(shapes), depth=config.data.prefetch)
  for _ in shapes:
    before = time.perf_counter()
    batch = next(batches)
    waited += time.perf_counter() - before
    params, opt_state, loss = step(params, opt_state, batch.inputs, batch.targets)
    loss.block_until_ready()
  total = time.perf_counter() - start
  print(f"first {args.steps} steps of the tiny run with prefetch={config.data.prefetch}: "
        f"{total:.2f} s, waited on the loader {waited * 1e3:.1f} ms = {waited / total:.2%}")


if __name__ == "__main__":
  main()
