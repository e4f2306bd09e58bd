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

`--compile_estimate --devices=N [--compile_s=S] [--tokens_per_s=R | --mfu=0.4]`: instead, the
run's summed compile time against its training time on N devices, for no padding and each
`compile.pad_multiple`, and the recommended one (JSON). Compile seconds per bucket: `--compile_s`
or measured by AOT-compiling the shortest and the longest bucket on N simulated CPU devices
(interpolated by length in between; attention compiled as XLA's one call, standing in for an
accelerator's fused kernel). Training rate: `--tokens_per_s` measured on the target,
or `--mfu` of the devices' peak (`hardware.peak_flops`, default an H100's bf16 datasheet peak).
Each option also gives `stall_s`: what the run waits for with `compile.threads` compiling the
upcoming buckets in the background, as the trainer does (bucket_cost.compile_stall_s).
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np
from absl import flags

from slw_jax import (attention, cli, compiled_steps, config_diff, config_lib, errors, hardware,
                     models, optim, pacing)

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

_COMPILE_ESTIMATE = flags.DEFINE_bool(
    "compile_estimate", False, "Summed compile time against training time per "
    "compile.pad_multiple on --devices devices, and the recommended one (JSON).")
_COMPILE_S = flags.DEFINE_float("compile_s", None, "--compile_estimate: compile seconds of one "
                                "bucket (default: measured on --devices simulated CPU devices).")
_TOKENS_PER_S = flags.DEFINE_float("tokens_per_s", None, "--compile_estimate: training tokens/s "
                                   "of the whole target (default: --mfu of the peak).")
_MFU = flags.DEFINE_float("mfu", 0.4, "--compile_estimate: model FLOPs utilization assumed "
                          "when --tokens_per_s is not given.")
DEFAULT_PEAK = (hardware.KNOWN_PEAKS["H100"][0], "H100 bf16 datasheet")

ROW_KEYS = ("step", "seqlen", "batch_size", "tokens", "lr")


def build_plan(config, every: int = 1) -> dict:
  """The plan of a validated config as a JSON-ready dict (rows every `every` steps)."""
  if every < 1:
    raise errors.UsageError(f"--every={every} is invalid: must be an integer >= 1")
  model_cfg = models.GPTConfig.from_config(config.model)
  n_params = models.num_params(model_cfg)
  schedule = pacing.run_schedule(config)
  lrs = optim.learning_rates(config, schedule)
  buckets = []
  for b in schedule.buckets():
    step_flops = b.batch_size * b.seqlen * models.train_flops_per_token(model_cfg, b.seqlen,
                                                                        n_params)
    buckets.append(dict(seqlen=b.seqlen, batch_size=b.batch_size, first_step=b.first_step,
                        num_steps=b.num_steps, flops_per_step=step_flops,
                        flops=step_flops * b.num_steps,
                        padding_fraction=round(b.padding_fraction, 6)))
  steps = np.arange(0, schedule.num_steps, every)
  if schedule.num_steps and steps[-1] != schedule.num_steps - 1:
    steps = np.append(steps, schedule.num_steps - 1)
  rows = [dict(step=int(t), seqlen=int(schedule.seqlen[t]), batch_size=int(schedule.batch_size[t]),
               tokens=int(schedule.tokens_before[t]), lr=float(lrs[t])) for t in steps]
  warm = pacing.warmup_end(config)
  padding = models.padding_params(model_cfg)
  plan = dict(num_params=n_params, published_params=n_params - padding,
              padded_vocab_rows=model_cfg.padded_vocab - model_cfg.vocab_size,
              total_steps=schedule.num_steps,
              pad_multiple=config.compile.pad_multiple,
              total_tokens=schedule.total_tokens, train_flops=sum(b["flops"] for b in buckets),
              lr_warmup_end=dict(step=warm.step, tokens=warm.tokens), buckets=buckets, rows=rows)
  if config.pacing.kind == "adaptive":
    plan["adaptive"] = adaptive_bounds(config)
  return plan


def adaptive_bounds(config) -> dict:
  """An adaptive run's two extremes: growing at every decision, and the deadline's floor (the
  rows and buckets above are the slowest: the real run is decided online, between them)."""
  bounds = {"note": "the real schedule is decided online, between these two; the rows above "
                    "are the slowest"}
  for name, changes in (("fastest", pacing.fastest_changes(config)),
                        ("slowest", pacing.initial_changes(config))):
    s = pacing.run_schedule(config, changes)
    full = int(np.argmax(s.seqlen >= config.pacing.seqlen_end))
    bounds[name] = dict(total_steps=s.num_steps, full_length_step=full,
                        buckets=[b.seqlen for b in s.buckets()])
  return bounds


def _summary_lines(plan: dict) -> list[str]:
  padding = plan["num_params"] - plan["published_params"]
  params = f"num_params: {plan['num_params']:,}" + (
      f" ({plan['published_params']:,} as published, plus {padding:,} in the "
      f"{plan['padded_vocab_rows']} padded vocabulary rows)" if padding else "")
  lines = [params, f"total_steps: {plan['total_steps']:,}",
           f"total_tokens: {plan['total_tokens']:,}",
           f"train_flops: {plan['train_flops']:.4g}",
           f"lr_warmup_end: step {plan['lr_warmup_end']['step']:,}, "
           f"tokens {plan['lr_warmup_end']['tokens']:,}",
           f"buckets: {len(plan['buckets'])} (seqlen x batch_size: first_step, steps, flops"
           f"{', padding' if plan['pad_multiple'] else ''})"]
  lines += [f"  {b['seqlen']} x {b['batch_size']}: {b['first_step']}, {b['num_steps']}, "
            f"{b['flops']:.4g}" + (f", {b['padding_fraction']:.1%}" if plan["pad_multiple"] else "")
            for b in plan["buckets"]]
  if "adaptive" in plan:
    bounds = plan["adaptive"]
    lines.append(f"adaptive pacing: {bounds['note']}")
    lines += [f"  {name}: {b['total_steps']:,} steps, full length from step "
              f"{b['full_length_step']:,}, buckets {', '.join(map(str, b['buckets']))}"
              for name, b in ((n, bounds[n]) for n in ("fastest", "slowest"))]
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
    raise errors.UsageError(f"--devices={count} is invalid: --memory needs --devices=N, N >= 1 "
                            "(the target's device count)")
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # The backend already started: use what it has.
    pass
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise errors.UsageError(f"--devices={count} is invalid here: this process already has "
                            f"{len(devices)} CPU devices (run plan in its own process)")
  return devices[:count]


def _check_memory_gib(device_memory_gib: float):
  if not (math.isfinite(device_memory_gib) and device_memory_gib > 0):
    raise errors.UsageError(f"--device_memory_gib={device_memory_gib} is invalid: must be a "
                            "number > 0 (GiB of one target device)")


def _usable_bytes(device_memory_gib: float) -> int:
  """What JAX may take of one device of this size (GPU_MEMORY_FRACTION)."""
  return int(device_memory_gib * 2**30 * hardware.GPU_MEMORY_FRACTION)


def _local_kernels(config) -> tuple[object, str]:
  """(config, note): cuDNN or splash attention, which the CPU cannot compile, estimated with
  the CPU's attention."""
  if config.model.attention not in config_diff.ACCELERATOR_KERNELS:
    return config, ""
  return config_diff.with_local_attention(config), (
      f"; model.attention={config.model.attention!r} is estimated with the CPU's attention")


def simulated_steps(config, devices, device_memory_gib: float, compiler_options=None):
  """(placed, steps, policy): the train steps laid out on `devices` as the trainer would, with
  microbatch counts chosen for the largest bucket against `device_memory_gib`."""
  from slw_jax import sharding, train_step  # pylint: disable=g-import-not-at-top
  shape = pacing.largest_bucket(pacing.run_schedule(config).buckets())
  placed = train_step.on_mesh(config, devices)
  sharding.check_batch_sizes(placed.layout, {"config.batch_size": config.batch_size})
  steps = train_step.sharded_steps(config, placed, skip_bad=False, background=False,
                                   compiler_options=compiler_options).executables
  policy, _ = compiled_steps.choose_microbatches(steps, config.optim.microbatches, shape,
                                                 placed.layout.batch_shards,
                                                 _usable_bytes(device_memory_gib))
  return placed, steps, policy


def memory_report(config, devices, device_memory_gib: float) -> dict:
  """Compiles the largest bucket on `devices` as the trainer would and reports its memory."""
  _check_memory_gib(device_memory_gib)
  config, note = _local_kernels(config)
  shape = pacing.largest_bucket(pacing.run_schedule(config).buckets())
  start = time.perf_counter()
  placed, steps, policy = simulated_steps(config, devices, device_memory_gib,
                                          compiled_steps.CPU_MEMORY_ESTIMATE_OPTIONS)
  steps.get(shape)
  stats = steps.stats[shape]
  steps.close()
  return dict(
      devices=len(devices), mesh=dict(placed.layout.mesh.shape), bucket=list(shape),
      bytes_per_device=stats.memory_bytes, gib_per_device=round(stats.memory_bytes / 2**30, 3),
      device_memory_gib=device_memory_gib, fits=stats.memory_bytes <= _usable_bytes(device_memory_gib),
      compile_s=round(stats.compile_s, 2), total_s=round(time.perf_counter() - start, 2),
      microbatches=policy.largest_count, microbatches_setting=config.optim.microbatches,
      remat=config.model.remat, dtype=config.model.dtype,
      attention=attention.resolve_attention(
          config.model.attention, config.model.dtype,
          attention_dropout=config.model.attention_dropout)[0],
      caveat=MEMORY_CAVEAT + note)


def measured_compile_seconds(config, devices, device_memory_gib: float = 80.0):
  """(seconds of one bucket as a function of its length, {length: measured seconds}): the
  shortest and the longest bucket AOT-compiled on `devices`, linear in between.

  Attention compiles as XLA's one call (`dot_product`), standing in for the one fused kernel
  (cuDNN, splash) an accelerator runs: the CPU's blockwise attention unrolls a loop of query
  blocks whose compile grows with the length (gpt3_125m at 2048: 28 s against 10 s,
  benchmarks/RESULTS.md). A config that sets `blockwise` itself keeps it."""
  if config.model.attention != "blockwise":
    config = config_lib.with_overrides(config, {"model.attention": "dot_product"})
  buckets = pacing.run_schedule(config).buckets()
  ends = sorted({(b.batch_size, b.seqlen) for b in buckets}, key=lambda s: s[1])
  _, steps, _ = simulated_steps(config, devices, device_memory_gib)
  measured = {}
  for shape in (ends[0], ends[-1]):
    compiled, stats = steps.compile_with(shape, steps.microbatches(*shape))
    measured[shape[1]] = stats.compile_s
    del compiled
  steps.close()
  lengths = sorted(measured)
  return (lambda seqlen: float(np.interp(seqlen, lengths, [measured[l] for l in lengths])),
          measured)


def compile_estimate(config, devices: int, compile_s: float | None, tokens_per_s: float | None,
                     mfu: float, measure=measured_compile_seconds) -> dict:
  """The summed compile time against training time for each padding choice (bucket_cost)."""
  from slw_jax import bucket_cost  # pylint: disable=g-import-not-at-top
  for flag, value in (("compile_s", compile_s), ("tokens_per_s", tokens_per_s), ("mfu", mfu)):
    if value is not None and not (math.isfinite(value) and value > 0):
      raise errors.UsageError(f"--{flag}={value} is invalid: must be a number > 0")
  schedule = pacing.run_schedule(config)
  model_cfg = models.GPTConfig.from_config(config.model)
  n_params = models.num_params(model_cfg)
  per_token = lambda seqlen: models.train_flops_per_token(model_cfg, seqlen, n_params)  # noqa
  if compile_s is None:
    compile_s_of, measured = measure(config, use_cpu_devices(devices))
    shown = ", ".join(f"{seqlen}: {seconds:.1f} s" for seqlen, seconds in measured.items())
    compile_source = (f"measured on {devices} simulated CPU devices with "
                      f"{'blockwise' if config.model.attention == 'blockwise' else 'one-call'} "
                      f"attention: {shown}")
  else:
    compile_s_of, compile_source = (lambda seqlen: compile_s), "--compile_s"
  if tokens_per_s is not None:  # FLOPs/s equivalent of a measured token rate at full length.
    flops_per_s = tokens_per_s * per_token(config.pacing.seqlen_end)
    rate_source = f"--tokens_per_s={tokens_per_s:g}"
  else:
    peak, where = ((config.hardware.peak_flops, "hardware.peak_flops")
                   if config.hardware.peak_flops else DEFAULT_PEAK)
    flops_per_s = devices * peak * mfu
    rate_source = f"{devices} devices x {peak:.3g} FLOP/s ({where}) x MFU {mfu:g}"
  cc = config.compile  # Buckets queued ahead as trainer._prefetch_upcoming does.
  ahead = cc.ahead and max(cc.ahead, cc.threads)
  costs = bucket_cost.Costs(compile_s_of, per_token, flops_per_s, cc.threads, ahead)
  options = bucket_cost.pad_options(schedule, config.pacing.multiple, config.pacing.seqlen_end,
                                    costs, also=cc.pad_multiple)
  current = next(o for o in options if o.pad_multiple == cc.pad_multiple)
  row = lambda o: dict(pad_multiple=o.pad_multiple, buckets=o.buckets,  # noqa: E731
                       compile_s=round(o.compile_s, 1), train_s=round(o.train_s, 1),
                       compile_share=round(o.compile_share, 5),
                       padding_fraction=round(o.padding_fraction, 5),
                       stall_s=round(o.stall_s, 1), stall_share=round(o.stall_share, 5))
  background = (f"compile.threads={cc.threads} compile in the background, {ahead} buckets "
                "ahead, beside training on the devices; stall_s is what the run waits for")
  return dict(assumptions=dict(compile_s=compile_source, rate=rate_source, stall=background),
              configured=row(current), recommended=row(bucket_cost.recommend(options)),
              options=[row(o) for o in options])


EXAMPLE = "python -m slw_jax.plan --config=configs/gpt2_117m.py --every=1000"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.CONFIG,))
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not (_MEMORY.value or _COMPILE_ESTIMATE.value) and _DEVICES.value is not None:
      raise errors.UsageError(f"--devices={_DEVICES.value} is only for --memory or "
                              "--compile_estimate; plain plan needs no devices")
    if _COMPILE_ESTIMATE.value:
      if _DEVICES.value is None or _DEVICES.value < 1:
        raise errors.UsageError(f"--devices={_DEVICES.value} is invalid: --compile_estimate needs "
                                "--devices=N, N >= 1 (the target's device count)")
      print(json.dumps(compile_estimate(config, _DEVICES.value, _COMPILE_S.value,
                                        _TOKENS_PER_S.value, _MFU.value)))
      return
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
