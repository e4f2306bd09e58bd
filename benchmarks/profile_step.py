"""Where the train step's time goes on this machine: XLA ops by kind, from a profiler trace.

Traces a few steps of the real train step (`train_step.make_train_step`) and sums the
duration of each XLA op, grouped by the op's kind (name without its number): matmul fusions
(`ynn_fusion`, `dot*`) against everything else (elementwise, broadcasts, transposes, ...).
Then, as a ceiling, times the same step with attention's score/softmax/value work removed
(each head's output is just v): what the step could reach if attention were free.

Usage: .venv/bin/python benchmarks/profile_step.py [--set model.d_model=384 ...] [--seqlen=256]
"""

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from slw_jax import attention, hardware, models, optim, train_step

import train_buckets  # pylint: disable=g-bad-import-order
import vs_torch  # pylint: disable=g-bad-import-order

MATMUL_KINDS = ("ynn_fusion", "dot", "dot_general")


def compiled_step(c, seqlen):
  optimizer = optim.make_optimizer(c.optim)
  graphdef, _ = train_step.build_model(c)
  init = jax.jit(train_step.make_init_fn(c, optimizer))
  tokens = jax.random.randint(jax.random.key(0), (c.batch_size, seqlen + 1), 0,
                              c.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  step = jax.jit(train_step.make_train_step(c, graphdef, optimizer, False), donate_argnums=0)
  state = init()
  return lambda s: step(s, batch, jnp.float32(1e-4)), state


def time_steps(step, state, steps):
  state, metrics = step(state)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times), state


def op_times(step, state, steps):
  """Seconds per step of each XLA op kind, summed over the executor's threads."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
      state, metrics = step(state)
      jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    profile = jax.profiler.ProfileData.from_file(path)
  kinds = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's op threads.
        continue
      for event in line.events:
        if event.name != "ThunkExecutor::Execute":
          kinds[re.sub(r"[.\d]+$", "", event.name)] += event.duration_ns / 1e9 / steps
  return kinds


def without_attention(self, x_bld):
  """Ablation only: the attention layer's projections, with each head's output = v."""
  w = self.qkv_weight_dchk[...].astype(self.dtype)
  qkv_blchk = jnp.einsum("bld,dchk->blchk", x_bld, w) + self.qkv_bias_chk[...].astype(self.dtype)
  out_w = self.out_weight_hkd[...].astype(self.dtype)
  return jnp.einsum("blhk,hkd->bld", qkv_blchk.sum(2), out_w)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--set", action="append", default=None)
  parser.add_argument("--seqlen", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  args.config, args.set = "configs/tiny.py", args.set or vs_torch.SMALL
  c = train_buckets.load(args)
  cfg = models.GPTConfig.from_config(c.model)
  flops = c.batch_size * args.seqlen * models.train_flops_per_token(
      cfg, args.seqlen, models.num_params(cfg))
  peak = hardware.measured_matmul_flops(2048)
  step, state = compiled_step(c, args.seqlen)
  step_s, state = time_steps(step, state, 5)
  kinds = op_times(step, state, args.steps)
  models.CausalSelfAttention.__call__ = without_attention
  ceiling_s, _ = time_steps(*compiled_step(c, args.seqlen), 5)
  peak = max(peak, hardware.measured_matmul_flops(2048))
  total = sum(kinds.values())
  matmul = sum(v for k, v in kinds.items() if k in MATMUL_KINDS)
  kernel = attention.resolve_attention(cfg.attention, cfg.dtype,
                                       attention_dropout=cfg.attention_dropout)[0]
  print(f"{' '.join(args.set)} seqlen {args.seqlen}, attention={kernel}; "
        f"float32 matmul rate {peak / 1e9:.1f} GFLOP/s")
  print(f"step {step_s * 1e3:.0f} ms = {flops / step_s / peak:.1%} MFU; "
        f"XLA ops {total * 1e3:.0f} ms/step, of which matmul fusions {matmul * 1e3:.0f} ms "
        f"({matmul / total:.0%})")
  print("| op kind | ms/step | share |\n| --- | --- | --- |")
  for kind, seconds in kinds.most_common(12):
    print(f"| {kind} | {seconds * 1e3:.1f} | {seconds / total:.1%} |")
  print(f"ceiling with attention removed: {ceiling_s * 1e3:.0f} ms = "
        f"{flops / ceiling_s / peak:.1%} MFU (same FLOP count)")


if __name__ == "__main__":
  main()
