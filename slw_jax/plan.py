"""`python -m slw_jax.plan --config=configs/X.py [--config.a.b=v ...] [--format=text|csv|json]
[--every=N]`: the whole run, step by step, without training or allocating the model.

Rows: `step, seqlen, batch_size, tokens, lr`, where `tokens` is the count consumed before the
step (the quantity the LR decay and the stop condition use). Summary: `num_params`,
`total_steps`, `total_tokens`, every bucket (distinct (seqlen, batch_size), in order of first
use) and the estimated training FLOPs.

`--memory --devices=N [--device_memory_gib=80]`: instead, AOT-compiles the largest bucket's
train step on N simulated CPU devices with the config's mesh, microbatches and remat, and
prints one JSON object: the bytes it needs per device and whether that fits (no accelerator is
needed: a memory proof before renting a cluster).
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np
from absl import flags

from slw_jax import cli, compile_cache, config_lib, hardware, models, pacing, schedules

_FORMAT = flags.DEFINE_enum("format", "text", ["text", "csv", "json"], "Output format.")
_EVERY = flags.DEFINE_integer("every", 1, "Print every N-th step (the last step always).")
_MEMORY = flags.DEFINE_bool("memory", False, "AOT-compile the largest bucket on --devices "
                            "simulated CPU devices and print its memory per device (JSON).")
_DEVICES = flags.DEFINE_integer("devices", None, "--memory: devices of the target machine(s).")
_DEVICE_MEMORY_GIB = flags.DEFINE_float("device_memory_gib", 80.0, "--memory: memory of one "
                                        "target device in GiB (H100: 80).")

MEMORY_CAVEAT = (
    "compiled by XLA:CPU (memory-optimized schedule, recomputation kept), whose buffer "
    "assignment and fusions differ from XLA:GPU/TPU, with the attention kernel the CPU runs "
    "(blockwise; cuDNN and splash keep less); 'fits' leaves "
    f"{1 - hardware.GPU_MEMORY_FRACTION:.0%} of the device to CUDA/cuDNN/NCCL workspaces")

ROW_KEYS = ("step", "seqlen", "batch_size", "tokens", "lr")


def build_plan(config, every: int = 1) -> dict:
  """The plan of a validated config as a JSON-ready dict (rows every `every` steps)."""
  if every < 1:
    raise cli.UsageError(f"--every={every} is invalid: must be an integer >= 1")
  model_cfg = models.GPTConfig.from_config(config.model)
  n_params = models.num_params(model_cfg)
  schedule = pacing.run_schedule(config)
  lrs = schedules.learning_rates(config, schedule)
  buckets = []
  for b in schedule.buckets():
    step_flops = b.batch_size * b.seqlen * models.train_flops_per_token(model_cfg, b.seqlen,
                                                                        n_params)
    buckets.append(dict(seqlen=b.seqlen, batch_size=b.batch_size, first_step=b.first_step,
                        num_steps=b.num_steps, flops_per_step=step_flops,
                        flops=step_flops * b.num_steps))
  steps = np.arange(0, schedule.num_steps, every)
  if schedule.num_steps and steps[-1] != schedule.num_steps - 1:
    steps = np.append(steps, schedule.num_steps - 1)
  rows = [dict(step=int(t), seqlen=int(schedule.seqlen[t]), batch_size=int(schedule.batch_size[t]),
               tokens=int(schedule.tokens_before[t]), lr=float(lrs[t])) for t in steps]
  warm = pacing.warmup_end(config)
  return dict(num_params=n_params, total_steps=schedule.num_steps,
              total_tokens=schedule.total_tokens, train_flops=sum(b["flops"] for b in buckets),
              lr_warmup_end=dict(step=warm.step, tokens=warm.tokens), buckets=buckets, rows=rows)


def _summary_lines(plan: dict) -> list[str]:
  lines = [f"num_params: {plan['num_params']:,}", f"total_steps: {plan['total_steps']:,}",
           f"total_tokens: {plan['total_tokens']:,}",
           f"train_flops: {plan['train_flops']:.4g}",
           f"lr_warmup_end: step {plan['lr_warmup_end']['step']:,}, "
           f"tokens {plan['lr_warmup_end']['tokens']:,}",
           f"buckets: {len(plan['buckets'])} (seqlen x batch_size: first_step, steps, flops)"]
  lines += [f"  {b['seqlen']} x {b['batch_size']}: {b['first_step']}, {b['num_steps']}, "
            f"{b['flops']:.4g}" for b in plan["buckets"]]
  return lines


def render(plan: dict, fmt: str) -> tuple[str, str]:
  """(stdout text, stderr text) of a plan in `fmt` (csv keeps the summary off stdout)."""
  if fmt == "json":
    return json.dumps(plan), ""
  rows = [(r["step"], r["seqlen"], r["batch_size"], r["tokens"], r["lr"]) for r in plan["rows"]]
  summary = "\n".join(_summary_lines(plan))
  if fmt == "csv":
    body = [",".join(ROW_KEYS)] + [f"{s},{l},{b},{t},{lr:.6e}" for s, l, b, t, lr in rows]
    return "\n".join(body), summary
  header = f"{'step':>10} {'seqlen':>7} {'batch_size':>10} {'tokens':>16} {'lr':>12}"
  body = [header] + [f"{s:>10} {l:>7} {b:>10} {t:>16} {lr:>12.4e}" for s, l, b, t, lr in rows]
  return "\n".join(body + ["", summary]), ""


def use_cpu_devices(count: int) -> list:
  """`count` CPU devices: JAX is told to make them when its backend has not started yet (the
  command line); an already running backend (tests) lends its first `count`."""
  if count is None or count < 1:
    raise cli.UsageError(f"--devices={count} is invalid: --memory needs --devices=N, N >= 1 "
                         "(the target's device count)")
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # The backend already started: use what it has.
    pass
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise cli.UsageError(f"--devices={count} is invalid here: this process already has "
                         f"{len(devices)} CPU devices (run plan in its own process)")
  return devices[:count]


def memory_report(config, devices, device_memory_gib: float) -> dict:
  """Compiles the largest bucket on `devices` as the trainer would and reports its memory."""
  from slw_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
  if not (math.isfinite(device_memory_gib) and device_memory_gib > 0):
    raise cli.UsageError(f"--device_memory_gib={device_memory_gib} is invalid: must be a "
                         "number > 0 (GiB of one target device)")
  note = ""
  if config.model.attention in ("cudnn", "splash"):  # Kernels the CPU cannot compile.
    note = (f"; model.attention={config.model.attention!r} is estimated with the CPU's "
            "attention")
    config = config_lib.with_local_attention(config)
  shape = pacing.largest_bucket(pacing.run_schedule(config).buckets())
  placed = train_step.on_mesh(config, devices)
  sharding.check_batch_sizes(placed.layout, {"config.batch_size": config.batch_size})
  steps = train_step.sharded_steps(
      config, placed, skip_bad=False, background=False,
      compiler_options=compile_cache.CPU_MEMORY_ESTIMATE_OPTIONS).steps
  limit = int(device_memory_gib * 2**30 * hardware.GPU_MEMORY_FRACTION)
  start = time.perf_counter()
  policy, _ = compile_cache.choose_microbatches(steps, config.optim.microbatches, shape,
                                                placed.layout.batch_shards, limit)
  steps.get(shape)
  stats = steps.stats[shape]
  steps.close()
  return dict(
      devices=len(devices), mesh=dict(placed.layout.mesh.shape), bucket=list(shape),
      bytes_per_device=stats.memory_bytes, gib_per_device=round(stats.memory_bytes / 2**30, 3),
      device_memory_gib=device_memory_gib, fits=stats.memory_bytes <= limit,
      compile_s=round(stats.compile_s, 2), total_s=round(time.perf_counter() - start, 2),
      microbatches=policy.largest_count, microbatches_setting=config.optim.microbatches,
      remat=config.model.remat, dtype=config.model.dtype,
      attention=models.resolve_attention(config.model.attention, config.model.dtype)[0],
      caveat=MEMORY_CAVEAT + note)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not _MEMORY.value and _DEVICES.value is not None:
      raise cli.UsageError(f"--devices={_DEVICES.value} is only for --memory (the memory "
                           "proof); plain plan needs no devices")
    if _MEMORY.value:
      devices = use_cpu_devices(_DEVICES.value)
      print(json.dumps(memory_report(config, devices, _DEVICE_MEMORY_GIB.value)))
      return
    out, err = render(build_plan(config, _EVERY.value), _FORMAT.value)
  if err:
    print(err, file=sys.stderr)
  print(out)


if __name__ == "__main__":
  main()
