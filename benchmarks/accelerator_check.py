"""One-command accelerator check: environment, bf16 matmul rate, GPT-2 117M steps, a tiny SLW run.

What it measures (each item is recorded even when another fails):
1. Environment: backend, device kind and count, package versions, Python.
2. bf16 matmul rate: best of 5 of a jitted `x @ y` on [N, N] (N = 8192; 512 with --smoke).
3. GPT-2 117M (configs/gpt2_117m.py) in bf16 at each `--seqlens` length, 64K tokens per step
   (rows = 65536 // seqlen), two steps each (the `step` column): `check`, dropout and
   attention dropout 0 (what llm.c times: the comparable number), and `recipe`, the paper's
   recipe as configured (dropout 0.1 and attention dropout 0.1, which rules the fused attention
   kernels out); through the codebase's own path: `train_step.on_mesh`,
   `sharded_steps`, `compiled_steps.choose_microbatches` (optim.microbatches=auto picks the
   fewest microbatches that fit the device memory). Per length: compile seconds, step ms,
   tokens/s, MFU against the datasheet bf16 peak (`hardware.KNOWN_PEAKS`) and against item 2,
   microbatches, device memory, whether the compiled HLO calls cuDNN fused attention
   (`__cudnn$fmha`), the attention kernel the config resolves to, and a finite loss.
4. A tiny SLW run (configs/tiny.py, 100 steps) through `slw_jax.trainer.Trainer`, on a byte
   corpus of this interpreter's standard library written here in `slw_jax.prepare`'s format (no
   TensorFlow needed); the loss must stay finite and fall.

Outputs in `--out` (default $OUT, else runs/accelerator_check): `accelerator_check.json`
(everything; rewritten after each item, so a killed run keeps what finished) and
`accelerator_check.md` (the table of item 3 and one line for each other item, also printed).
Exit status 0 when every item ran and passed its checks, else 1.

On the device tool (from the repo root; the ml_collections and tensorboardX wheels copied into
the ignored `.whl/` folder and carried), one H100, under 8 minutes:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/accelerator_check.py --out=$OUT

Here, on the CPU (tiny shapes, under a minute; tests/test_accelerator_check.py runs this):

  .venv/bin/python benchmarks/accelerator_check.py --smoke --out=/tmp/accelerator_check
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

_START = time.perf_counter()  # Before importing JAX: progress lines count its import too.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `python3 benchmarks/accelerator_check.py` finds slw_jax without setup.

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from slw_jax import (attention, compiled_steps, config_lib, hardware, models,  # noqa: E402
                     train_step)

TOKENS_PER_STEP = 65536  # Rows per length = this // seqlen: the same work at every length.
# Per profile: the config of item 3, its lengths and rows (None: TOKENS_PER_STEP // seqlen),
# the matmul size, timed steps, the tiny run's steps and eval interval, and the time budget.
FULL = {"config": os.path.join(REPO, "configs/gpt2_117m.py"), "seqlens": "128,512,1024",
        "rows": None, "matmul_n": 8192, "steps": 10, "train_steps": 100, "eval_every": 50,
        "budget_s": 450.0}
SMOKE = {"config": os.path.join(REPO, "configs/tiny.py"), "seqlens": "32,64", "rows": 4,
         "matmul_n": 512, "steps": 2, "train_steps": 20, "eval_every": 10, "budget_s": 1e9}
# Item 3's steps: overrides of the config per `step` column. configs/tiny.py trains without
# dropout, so --smoke gives its recipe the paper's 0.1 to exercise the same path.
STEP_KINDS = {"check": {"model.dropout": 0.0, "model.attention_dropout": 0.0}, "recipe": {}}
SMOKE_RECIPE = {"model.dropout": 0.1, "model.attention_dropout": 0.1}
WARMUP_STEPS = 2
# Imported by none of this check's own code: TensorFlow and seqio are absent on the GPU machine.
FORBIDDEN_MODULES = ("tensorflow", "seqio", "tensorflow_datasets")


def log(message: str):
  """A progress line with the seconds since start, flushed (a killed run shows where it was)."""
  print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
  """Flags; unset ones take the full (accelerator) or --smoke (CPU) profile's value."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes for a CPU (< 60 s).")
  parser.add_argument("--out", default=os.environ.get("OUT") or "runs/accelerator_check")
  parser.add_argument("--seqlens", default=None, help="Comma list (default 128,512,1024).")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps per length (10).")
  parser.add_argument("--train_steps", type=int, default=None, help="Tiny run's steps (100).")
  parser.add_argument("--microbatches", default="auto", help="optim.microbatches of item 3: "
                      "auto (searched by compiling) or a fixed count (one compile per length).")
  parser.add_argument("--budget_s", type=float, default=None, help="Skip a length that would "
                      "start after this many seconds minus the previous length's time (450).")
  args = parser.parse_args(argv)
  profile = SMOKE if args.smoke else FULL
  for key, value in profile.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  args.seqlens = [int(s) for s in str(args.seqlens).split(",") if s.strip()]
  if args.microbatches != "auto":
    args.microbatches = int(args.microbatches)
  return args


# ----- 1. environment ----------------------------------------------------------------------------

def _version(distribution: str):
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  """Backend, devices, package versions and the settings that change speed or memory."""
  device = jax.devices()[0]
  try:  # e.g. the CUDA runtime/driver versions; not every JAX version has this attribute.
    platform_version = device.client.platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = None
  packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
              "ml_collections", "tensorboardX", "jax-cuda13-plugin", "jax-cuda13-pjrt",
              "jax-cuda12-plugin", "jax-cuda12-pjrt")
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
          "platform_version": platform_version, "python": platform.python_version(),
          "versions": {name: _version(name) for name in packages},
          "jax_version": jax.__version__,
          "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_FLAGS",
                                                  "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES")},
          "device_memory_limit": hardware.device_memory_limit(),
          "datasheet_bf16_peak": datasheet_peak(device.device_kind)}


def datasheet_peak(device_kind: str) -> float | None:
  """The bf16 datasheet peak (`hardware.datasheet_peak`), or None for a device it does not
  list (e.g. a CPU): no measured fallback, so an unknown device gives a null MFU."""
  peaks = hardware.datasheet_peak(device_kind)
  return None if peaks is None else peaks[0]


# ----- 2. bf16 matmul rate -----------------------------------------------------------------------

def matmul_rate(n: int, repeats: int = 5) -> dict:
  """Best of `repeats` of a jitted bf16 [n, n] @ [n, n]: FLOP/s = 2 n^3 / seconds."""
  kx, ky = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, n), jnp.bfloat16)
  y = jax.random.normal(ky, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(x, y).block_until_ready()  # Compile and warm up outside the timing.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x, y).block_until_ready()
    times.append(time.perf_counter() - start)
  best = min(times)
  return {"n": n, "dtype": "bfloat16", "repeats": repeats, "best_s": best,
          "flops_per_s": 2.0 * n**3 / best}


# ----- 3. GPT-2 117M train steps -----------------------------------------------------------------

def step_config(path: str, seqlen: int, rows: int, microbatches, overrides: dict | None = None):
  """The validated config of one length: bf16, one device, no pacing, `rows` sequences, then
  `overrides` (dotted keys, e.g. STEP_KINDS' dropout settings). Raises ConfigError."""
  base = config_lib.load_config_file(path)
  defaults = {"pacing.kind": "none", "pacing.seqlen_end": seqlen,
              "model.max_seqlen": max(base.model.max_seqlen, seqlen), "model.dtype": "bfloat16",
              "batch_size": rows, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1,
              "optim.microbatches": microbatches, "compile.cache_dir": ""}
  return config_lib.validate(config_lib.load_config_file(path, {**defaults, **(overrides or {})}))


def compile_bucket(c, shape: tuple[int, int], limit_bytes: int | None = -1,
                   compiler_options: dict | None = None) -> dict:
  """Lays the model out on the first device and compiles the bucket's step the way the trainer
  does (microbatches chosen against `limit_bytes` first; default: the device's memory limit),
  with `compiler_options` merged into the trainer's own. Returns the parts and timings."""
  if limit_bytes == -1:
    limit_bytes = hardware.device_memory_limit()
  placed = train_step.on_mesh(c, jax.devices()[:1])
  device = train_step.sharded_steps(c, placed, skip_bad=False, background=False,
                                    compiler_options=compiler_options)
  start = time.perf_counter()
  _, line = compiled_steps.choose_microbatches(device.executables, c.optim.microbatches, shape,
                                               placed.layout.batch_shards, limit_bytes)
  executable = device.executables.get(shape)  # Already compiled (and kept) when "auto" searched.
  return {"placed": placed, "device": device, "executable": executable,
          "stats": device.executables.stats[shape], "microbatch_line": line,
          "compile_total_s": time.perf_counter() - start}


def time_steps(built: dict, shape: tuple[int, int], vocab_size: int, steps: int,
               trace_dir: str | None = None, trace_steps: int = 3) -> dict:
  """Runs WARMUP_STEPS + `steps` steps on random tokens, the state donated as in training; each
  step waits for its metrics (block_until_ready), so a step's time is the device's. With
  `trace_dir`, `trace_steps` more steps then run under `jax.profiler.trace` (not timed; a
  failure there is returned as `trace_error`)."""
  rows, seqlen = shape
  tokens = np.random.default_rng(seqlen).integers(0, vocab_size, (rows, seqlen + 1), np.int32)
  local = {"inputs": np.ascontiguousarray(tokens[:, :-1]),
           "targets": np.ascontiguousarray(tokens[:, 1:])}
  batch = built["placed"].layout.global_batch(local, rows)
  state, executable, lr = built["device"].init(), built["executable"], np.float32(1e-4)
  losses, times = [], []
  for step in range(WARMUP_STEPS + steps):
    start = time.perf_counter()
    state, metrics = executable(state, batch, lr)
    jax.block_until_ready(metrics)
    if step >= WARMUP_STEPS:
      times.append(time.perf_counter() - start)
    losses.append(float(metrics["loss"]))
  trace_error = None
  if trace_dir:
    try:
      with jax.profiler.trace(trace_dir):
        for _ in range(trace_steps):
          state, metrics = executable(state, batch, lr)
          jax.block_until_ready(metrics)
    except Exception as error:  # pylint: disable=broad-except  (the timing above still stands)
      traceback.print_exc()
      trace_error = f"{type(error).__name__}: {error}"[:1000]
  del state, batch
  return {"step_s": statistics.median(times), "step_min_s": min(times), "losses": losses,
          "trace_error": trace_error}


def device_peak_bytes() -> int | None:
  """The allocator's peak bytes in use since the process started (None where not reported)."""
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def throughput(c, built: dict, timed: dict, shape: tuple[int, int], peaks: dict) -> dict:
  """Tokens/s, model FLOP/s and MFU against the datasheet peak and the measured matmul rate."""
  rows, seqlen = shape
  model_cfg = models.GPTConfig.from_config(c.model)
  num_params = built["placed"].num_params
  tokens_per_s = rows * seqlen / timed["step_s"]
  flops_per_s = tokens_per_s * models.train_flops_per_token(model_cfg, seqlen, num_params)
  return {"num_params": num_params, "step_ms": timed["step_s"] * 1e3,
          "step_min_ms": timed["step_min_s"] * 1e3, "tokens_per_s": tokens_per_s,
          "model_flops_per_s": flops_per_s,
          "mfu_datasheet": flops_per_s / peaks["datasheet"] if peaks["datasheet"] else None,
          "mfu_measured_matmul": flops_per_s / peaks["matmul"] if peaks["matmul"] else None}


def kind_overrides(args, kind: str) -> dict:
  """The config overrides of item 3's step `kind` (STEP_KINDS; --smoke's recipe has dropout)."""
  if kind == "recipe" and args.smoke:
    return dict(SMOKE_RECIPE)
  return dict(STEP_KINDS[kind])


def measure_length(args, kind: str, seqlen: int, peaks: dict) -> dict:
  """One row of item 3: compile, time and check the step `kind` at `seqlen`."""
  rows = args.rows or TOKENS_PER_STEP // seqlen
  c = step_config(args.config, seqlen, rows, args.microbatches, kind_overrides(args, kind))
  built = compile_bucket(c, (rows, seqlen))
  stats = built["stats"]
  log(f"{kind} seqlen {seqlen}: {built['microbatch_line']}; compiled in {stats.compile_s:.1f} s "
      f"({built['compile_total_s']:.1f} s with the microbatch search)")
  # XLA:GPU lowers jax.nn.dot_product_attention(implementation="cudnn") to this custom call.
  cudnn_in_hlo = "__cudnn$fmha" in (built["executable"].as_text() or "")
  timed = time_steps(built, (rows, seqlen), c.model.vocab_size, args.steps)
  m = c.model
  kernel, why = attention.resolve_attention(m.attention, m.dtype,
                                            attention_dropout=m.attention_dropout)
  bucket_kernel, bucket_why = attention.bucket_attention(
      m.attention, m.dtype, seqlen, models.GPTConfig.from_config(m).head_dim,
      attention_dropout=m.attention_dropout)
  row = {"step": kind, "seqlen": seqlen, "rows": rows, "tokens_per_step": rows * seqlen,
         "dropout": m.dropout, "attention_dropout": m.attention_dropout,
         "microbatches": stats.microbatches, "microbatch_line": built["microbatch_line"],
         "compile_s": stats.compile_s, "compile_total_s": built["compile_total_s"],
         **throughput(c, built, timed, (rows, seqlen), peaks),
         "memory_bytes_compiled": stats.memory_bytes,
         "peak_bytes_in_use_process": device_peak_bytes(), "cudnn_in_hlo": cudnn_in_hlo,
         "attention": kernel, "attention_why": why, "attention_bucket": bucket_kernel,
         "attention_bucket_why": bucket_why, "losses": timed["losses"],
         "loss_last": timed["losses"][-1],
         "loss_finite": all(math.isfinite(x) for x in timed["losses"])}
  built["device"].executables.close()
  built.clear()  # Drops the executable and state layout before the next length compiles.
  return row


def measure_lengths(args, peaks: dict, rows: list, record):
  """Item 3: each step kind (STEP_KINDS, the check first) over `args.seqlens`, appending to
  `rows` (and saving after each): a failure (e.g. out of memory) becomes that row's `error`; a
  row that would overrun `args.budget_s` (judged by the previous row's time) is skipped."""
  last_s = 0.0
  for kind in STEP_KINDS:
    for seqlen in args.seqlens:
      elapsed, name = time.perf_counter() - _START, f"{kind} seqlen {seqlen}"
      if elapsed + last_s > args.budget_s:
        rows.append({"step": kind, "seqlen": seqlen, "error": f"skipped: {elapsed:.0f} s + the "
                     f"previous row's {last_s:.0f} s would pass --budget_s={args.budget_s:.0f}"})
        log(f"{name}: {rows[-1]['error']}")
        continue
      start = time.perf_counter()
      log(f"{name}: building and compiling")
      try:
        row = measure_length(args, kind, seqlen, peaks)
      except Exception as error:  # pylint: disable=broad-except
        traceback.print_exc()
        row = {"step": kind, "seqlen": seqlen, "error": f"{type(error).__name__}: {error}"[:2000]}
      jax.clear_caches()  # Frees this row's executables before the next one compiles.
      gc.collect()
      last_s = time.perf_counter() - start
      row["wall_s"] = last_s
      rows.append(row)
      record()
      log(f"{name}: " + (row.get("error") or f"{row['step_ms']:.1f} ms/step, "
                         f"{row['tokens_per_s']:,.0f} tokens/s in {last_s:.1f} s"))


# ----- 4. a tiny SLW run through the trainer -----------------------------------------------------

def read_losses(workdir: str) -> list[float]:
  """Training losses of metrics.jsonl in step order ("nan"/"inf" strings become floats)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [float(r["loss"]) for r in rows if "loss" in r]


def tiny_run(args) -> dict:
  """Item 4: configs/tiny.py for `args.train_steps` steps through the real trainer on one device,
  in a temporary workdir and data directory; checks the loss stays finite and falls."""
  from slw_jax import trainer  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="slw_accel_") as tmp:
    data_dir, workdir = os.path.join(tmp, "data"), os.path.join(tmp, "run")
    path = os.path.join(REPO, "configs/tiny.py")
    # tiny.py's LR warmup (30 steps) must end before a shorter run's step-based decay does.
    warmup = min(config_lib.load_config_file(path).optim.warmup_steps, args.train_steps // 2)
    c = config_lib.validate(config_lib.load_config_file(path, {
        "train_steps": args.train_steps, "train_tokens": None, "optim.warmup_steps": warmup,
        "data.dir": data_dir, "data.source": "pystdlib", "data.vocab": "byte",
        "compile.cache_dir": "", "checkpoint.every_steps": 10**9,
        "eval.every_steps": args.eval_every, "mesh.data": 1,
        "log.print_every_steps": max(1, args.train_steps // 4)}))
    # The byte vocabulary prepares without TensorFlow (which the GPU image lacks).
    from slw_jax import prepare  # pylint: disable=g-import-not-at-top
    meta = prepare.prepare(c, log=log, workers=1)
    log(f"tiny run: wrote {meta['splits']['train']['tokens']:,} train / "
        f"{meta['splits']['validation']['tokens']:,} validation byte tokens; training")
    summary = trainer.Trainer(c, workdir, jax.devices()[:1]).run()
    losses = read_losses(workdir)
  head, tail = losses[:10], losses[-10:]
  finite = bool(losses) and all(math.isfinite(x) for x in losses)
  return {"steps": summary["steps"], "completed": summary["completed"],
          "wall_time_s": summary["wall_time_s"], "compile_stall_s": summary["compile_stall_s"],
          "compile_stall_after_step0_s": summary["compile_stall_after_step0_s"],
          "buckets": len(summary["buckets"]), "final_val_loss": summary["final_val_loss"],
          "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
          "first10_mean": statistics.fmean(head) if head else None,
          "last10_mean": statistics.fmean(tail) if tail else None, "loss_finite": finite,
          "loss_fell": finite and statistics.fmean(tail) < statistics.fmean(head),
          "train_tokens": meta["splits"]["train"]["tokens"]}


# ----- 5. output ---------------------------------------------------------------------------------

def _fmt(value, spec: str, scale: float = 1.0) -> str:
  return "-" if value is None else format(value * scale, spec)


def table(rows: list[dict]) -> list[str]:
  """Markdown table of item 3 (one row per step kind and length; a failed one shows its error)."""
  lines = ["| step | seqlen | rows | microbatches | compile s | step ms | tokens/s | "
           "MFU datasheet | MFU vs matmul | memory GiB (compiled / process peak) | attention | "
           "cuDNN fmha in HLO | loss |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['step']} | {r['seqlen']} | error: "
                   f"{r['error'][:200].replace('|', '/')} |")
      continue
    memory = (f"{_fmt(r['memory_bytes_compiled'], '.2f', 2**-30)} / "
              f"{_fmt(r['peak_bytes_in_use_process'], '.2f', 2**-30)}")
    attention = r["attention"]  # What the config resolves to; a bucket may fall back from it.
    if r["attention_bucket"] != attention:
      attention += f" -> {r['attention_bucket']}"
    lines.append(
        f"| {r['step']} | {r['seqlen']} | {r['rows']} | {r['microbatches']} | "
        f"{r['compile_s']:.1f} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
        f"{_fmt(r['mfu_datasheet'], '.1%')} | {_fmt(r['mfu_measured_matmul'], '.1%')} | "
        f"{memory} | {attention} | "
        f"{r['cudnn_in_hlo']} | {r['loss_last']:.3f} |")
  return lines


def summary_lines(result: dict) -> list[str]:
  """One line each for items 1, 2 and 4 (or their errors)."""
  env, mm, run = (result.get(k) or {} for k in ("environment", "matmul", "tiny_run"))
  versions = env.get("versions", {})
  lines = [f"environment: {env['error']}" if "error" in env else
           f"environment: {env.get('backend')} {env.get('device_kind')} "
           f"x{env.get('device_count')}, jax {versions.get('jax')} / jaxlib "
           f"{versions.get('jaxlib')}, flax {versions.get('flax')}, optax "
           f"{versions.get('optax')}, Python {env.get('python')}"]
  if "flops_per_s" in mm:
    peak, share = env.get("datasheet_bf16_peak"), ""
    if peak:
      share = f" ({mm['flops_per_s'] / peak:.0%} of the {peak / 1e12:.0f} TFLOP/s datasheet)"
    lines.append(f"bf16 matmul {mm['n']}^3: {mm['flops_per_s'] / 1e12:.2f} TFLOP/s{share}")
  else:
    lines.append(f"bf16 matmul: {mm.get('error', 'not run')}")
  if "steps" in run:
    lines.append(f"tiny SLW run: {run['steps']} steps in {run['wall_time_s']:.1f} s, loss "
                 f"{run['first_loss']:.3f} -> {run['last_loss']:.3f} (first/last 10 mean "
                 f"{run['first10_mean']:.3f} -> {run['last10_mean']:.3f}, fell: "
                 f"{run['loss_fell']}), compile stall {run['compile_stall_s']:.1f} s "
                 f"({run['compile_stall_after_step0_s']:.1f} s after step 0), "
                 f"{run['buckets']} buckets")
  else:
    lines.append(f"tiny SLW run: {run.get('error', 'not run')}")
  return lines


def failures(result: dict) -> list[str]:
  """What failed: an item's error, a non-finite loss, a loss that did not fall."""
  failed = [k for k in ("environment", "matmul", "tiny_run")
            if "error" in (result.get(k) or {"error": "not run"})]
  for r in result.get("steps_by_seqlen", []):
    if "error" in r or not r.get("loss_finite"):
      failed.append(f"{r['step']} seqlen {r['seqlen']}")
  if not (result.get("tiny_run") or {}).get("loss_fell", False) and "tiny_run" not in failed:
    failed.append("tiny_run (loss did not fall or was not finite)")
  if result.get("imported_forbidden"):
    failed.append(f"imported {', '.join(result['imported_forbidden'])}")
  return failed


def _plain(value):
  """JSON-safe: non-finite floats as "nan"/"inf" strings (as metrics.jsonl writes them)."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def write_json_atomic(path: str, value):
  """Writes `value` as JSON to `path` through a temporary file and a rename: a kill mid-write
  leaves the previous complete file."""
  with open(path + ".tmp", "w") as f:
    json.dump(_plain(value), f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def write_json(out: str, result: dict):
  """Writes `out`/accelerator_check.json (after every item, so a partial run leaves a record)."""
  result["elapsed_s"] = time.perf_counter() - _START
  write_json_atomic(os.path.join(out, "accelerator_check.json"), result)


def run_item(result: dict, key: str, fn, *fn_args):
  """result[key] = fn(*fn_args), or {"error": ...} when it raises; logs how long it took."""
  start = time.perf_counter()
  log(f"{key}: start")
  try:
    result[key] = fn(*fn_args)
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    result[key] = {"error": f"{type(error).__name__}: {error}"[:2000]}
  log(f"{key}: done in {time.perf_counter() - start:.1f} s")


def main(argv=None) -> int:
  """Runs items 1, 2, 4, then 3 (the long one, under the time budget); returns the exit status."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  result = {"smoke": args.smoke, "args": vars(args)}
  record = lambda: write_json(args.out, result)  # noqa: E731
  run_item(result, "environment", environment)
  record()
  run_item(result, "matmul", matmul_rate, args.matmul_n)
  record()
  # The tiny run goes before the long item 3, so the time budget never cuts it.
  run_item(result, "tiny_run", tiny_run, args)
  jax.clear_caches()  # The trainer's executables and state are not needed any more.
  gc.collect()
  record()
  peaks = {"datasheet": (result["environment"] or {}).get("datasheet_bf16_peak"),
           "matmul": (result["matmul"] or {}).get("flops_per_s")}
  result["steps_by_seqlen"] = []
  measure_lengths(args, peaks, result["steps_by_seqlen"], record)
  result["imported_forbidden"] = sorted({m.split(".")[0] for m in sys.modules
                                         if m.split(".")[0] in FORBIDDEN_MODULES})
  result["failed"] = failures(result)
  result["ok"] = not result["failed"]
  lines = table(result["steps_by_seqlen"]) + [""] + summary_lines(result)
  lines.append(f"status: {'ok' if result['ok'] else 'FAILED: ' + '; '.join(result['failed'])}"
               f" ({time.perf_counter() - _START:.0f} s)")
  record()
  with open(os.path.join(args.out, "accelerator_check.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n" + "\n".join(lines), flush=True)
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  hardware.use_gpu_memory_fraction()  # As slw_jax.main: before the backend starts.
  sys.exit(main())
