"""Per-bucket compile seconds, step time, tokens/s and MFU of the real train step.

MFU is reported against this machine's float32 matmul rate measured in the same run (CPU) or
the datasheet peak (accelerators). Steps run back to back on one device with the state donated,
as in training.

Usage:
  .venv/bin/python benchmarks/train_buckets.py [--config=configs/tiny.py] [--seqlens=32,128,256]
      [--steps=10] [--set model.n_layer=6 --set model.d_model=384 ...]
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from slw_jax import compiled_steps, config_lib, hardware, models, optim, pacing, train_step


def parse_args():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--seqlens", default="", help="Comma list; default: every bucket.")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], help="key=value override.")
  parser.add_argument("--json", default="", help="Also write the rows to this file.")
  return parser.parse_args()


def load(args):
  overrides = {}
  for item in args.set:
    key, value = item.split("=", 1)
    overrides[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
  return config_lib.validate(config_lib.load_config_file(args.config, overrides))


def measure(c, shapes, steps):
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  init = jax.jit(train_step.make_init_fn(c, optimizer))
  state = init()
  bucketed = compiled_steps.BucketedStep(
      lambda k: train_step.make_train_step(c, graphdef, optimizer, False, k),
      jax.eval_shape(init), background=False)
  cfg = models.GPTConfig.from_config(c.model)
  n_params = models.num_params(cfg)
  rows = []
  for batch_size, seqlen in shapes:
    executable = bucketed.get((batch_size, seqlen))
    tokens = jax.random.randint(jax.random.key(0), (batch_size, seqlen + 1), 0,
                                c.model.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, m = executable(state, batch, jnp.float32(1e-4))  # Warm up.
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, m = executable(state, batch, jnp.float32(1e-4))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = batch_size * seqlen * models.train_flops_per_token(cfg, seqlen, n_params)
    rows.append({"batch_size": batch_size, "seqlen": seqlen,
                 "compile_s": bucketed.stats[(batch_size, seqlen)].compile_s,
                 "step_s": step_s, "tokens_per_s": batch_size * seqlen / step_s,
                 "flops_per_s": flops / step_s})
  return n_params, rows


def main():
  args = parse_args()
  c = load(args)
  if args.seqlens:
    shapes = [(c.batch_size, int(s)) for s in args.seqlens.split(",")]
  else:
    shapes = [(b.batch_size, b.seqlen) for b in pacing.run_schedule(c).buckets()]
  peak, source = hardware.peak_flops(c.hardware.peak_flops, c.model.dtype)
  n_params, rows = measure(c, shapes, args.steps)
  peak_after, _ = hardware.peak_flops(c.hardware.peak_flops, c.model.dtype)
  peak = max(peak, peak_after)  # Measured twice (before and after): the better rate.
  print(f"{args.config} {' '.join(args.set)}: {n_params:,} params, {jax.devices()[0].device_kind}"
        f", peak {peak / 1e9:.1f} GFLOP/s ({source})")
  print(f"{'bucket':>10} {'compile s':>9} {'step ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
        f"{'MFU':>6}")
  for r in rows:
    r["mfu"] = r["flops_per_s"] / peak
    print(f"{r['batch_size']:>4}x{r['seqlen']:<5} {r['compile_s']:9.2f} {r['step_s'] * 1e3:9.1f} "
          f"{r['tokens_per_s']:10,.0f} {r['flops_per_s'] / 1e9:8.1f} {r['mfu']:6.1%}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_flops": peak, "peak_source": source, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
