"""The GPU A/B matrix of docs GPU-PERFORMANCE.md: where the GPT-2 117M step's time goes.

What: each variant (VARIANTS: the H100 check as it ran, one change at a time, the best
combination, the paper recipe with XLA and with cuDNN attention) is the trainer's own compiled
step (`train_step.on_mesh`, `sharded_steps`, `compiled_steps.choose_microbatches`, the state
donated; benchmarks/accelerator_check.py's functions) at --rows x --seqlen (64 x 1024). Per
variant: compile seconds, memory analysis, the need with XLA's rematerialization pass off,
microbatches, step ms (2 warm-up + 5 timed), tokens/s, MFU (datasheet and measured bf16
matmul), from the compiled HLO the gemm operand dtypes, cuDNN fmha calls and remat clones, XLA's
"Can't reduce memory use below" warning (read from this process's stderr while it compiles), and
finite losses. V0 and V7 are also traced (`jax.profiler`, 3 steps) and summarized: device time
by category, top ops with their source lines. The h100 pass also runs
benchmarks/cudnn_dropout_probe.py (does Rc's cuDNN dropout drop what it should?). Then the
PyTorch peer (benchmarks/torch_peer.py).

Why: one short device session must settle which suspects cost what, and a session without a
device must be able to decide from the printed tables (gpu_ab.md) alone.

Files: this one runs the matrix (flags, variants, their configs and input checks, one variant,
the passes, the parent); benchmarks/gpu_ab_hlo.py reads the compiled HLO and the traces,
benchmarks/gpu_ab_tables.py prints the tables and benchmarks/gpu_ab_torch.py runs the PyTorch
peer: apart so that each stays short and is tested on its own (none imports this script).

Passes: the lent GPU is an H200 but the reference was an H100 (allocator limit 71.26 GiB). Each
pass is a child process of this script (`--pass=h100|native`), since
XLA_PYTHON_CLIENT_MEM_FRACTION acts only before JAX's backend starts: first the whole matrix
with the limit of an H100 (the fraction from nvidia-smi's total memory), then V0 and V7 at the
default fraction; the torch peer runs after both (JAX preallocates GPU memory, so they never
overlap). This parent never starts a JAX backend. On a CPU the same passes run uncapped.
--budget_s (360) is the whole run's: no variant starts that would end past it, judged by the
one before (RUN_ORDER puts the most telling first); the torch peer may end up to ~100 s later.

Outputs in --out (default $OUT, else runs/gpu_ab): gpu_ab.json and gpu_ab.md (the tables, also
printed at the end), both rewritten (atomically) after every variant, so a killed run leaves
both; hlo_V0.txt.gz and hlo_V7.txt.gz (the compiled HLO of the profiled variants).
Exit status: 2 on bad input (unknown variant, budget below one variant, rows/seqlen the configs
reject, cuDNN dropout asked for where there is none: one `error:` line on stderr, before any
compile), 1 when a pass crashed, else 0 (a variant that failed is a row with its error).

On the device tool (repo root; first, here, `mkdir -p .whl && cp ../shared/wheels/device/*.whl
.whl/`, and carry [".whl"]), about 6-8 minutes, so timeout_s=480:

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \
      python3 benchmarks/gpu_ab.py --out=$OUT 2>&1 | tee $OUT/gpu_ab.log

Here, on the CPU (tiny shapes, every variant, 1.5 minutes; tests/test_gpu_ab.py runs it):

  JAX_PLATFORMS=cpu .venv/bin/python benchmarks/gpu_ab.py --smoke --out=/tmp/gpu_ab
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# accelerator_check, whose functions this script reuses; gpu_ab_hlo and gpu_ab_tables, its parts.
sys.path.insert(0, HERE)
import accelerator_check as check  # noqa: E402  pylint: disable=wrong-import-position

# pylint: disable=wrong-import-position
import jax  # noqa: E402

from gpu_ab_hlo import PROFILE_STEPS, hlo_facts, summarize_profile  # noqa: E402
from gpu_ab_tables import render  # noqa: E402
import gpu_ab_torch as peer  # noqa: E402
from slw_jax import attention, compiled_steps, config_lib, errors, hardware  # noqa: E402

log = check.log
GIB = 2**30
H100_LIMIT = 71.26 * GIB  # JAX's allocator limit on the H100 of benchmarks/RESULTS.md.
# That H100 (79.65 GiB by nvidia-smi) gave 71.26 GiB at fraction 0.90 = 0.90 x 79.18 GiB: the
# fraction applies to the memory CUDA reports once started, this much below nvidia-smi's total.
CUDA_RESERVE = 0.47 * GIB

FULL = {"config": os.path.join(check.REPO, "configs/gpt2_117m.py"), "rows": 64, "seqlen": 1024,
        "steps": 5, "budget_s": 360.0, "matmul_n": 8192, "model": {},
        # Seconds kept back from the h100 pass for the native pass (a JAX start, V0 and V7)
        # and for the torch peer (torch.compile and 7 steps).
        "reserve_native_s": 90.0, "reserve_torch_s": 75.0, "torch_compile": True,
        "options": None, "cache": False}
SMOKE = {"config": os.path.join(check.REPO, "configs/gpt2_117m.py"), "rows": 4, "seqlen": 32,
         "steps": 2, "budget_s": 1e9, "matmul_n": 256,
         # configs/tiny.py-sized; scanned as the 117M is; chunks smaller than the batch.
         "model": {"model.n_layer": 2, "model.d_model": 64, "model.n_head": 2,
                   "model.vocab_size": 259, "model.scan_layers": True,
                   "model.loss_chunk_tokens": 64},
         "reserve_native_s": 0.0, "reserve_torch_s": 5.0, "torch_compile": False,
         # XLA:CPU compiles take most of the smoke's time: half as long without LLVM's
         # optimizations, and the passes share a persistent cache (the native pass hits it).
         "options": {"xla_backend_optimization_level": 0}, "cache": True}
# The least budget one variant needs (a compile, 7 steps): below it nothing could run.
MIN_VARIANT_S = {"full": 30.0, "smoke": 5.0}


@dataclasses.dataclass(frozen=True)
class Variant:
  """One cell of the matrix: config overrides on the check's base, extra compiler options."""
  change: str
  overrides: dict = dataclasses.field(default_factory=dict)
  options: dict | None = None
  profile: bool = False
  compile_only: bool = False
  # Take the microbatch count this variant chose (its "auto" search) instead of searching again:
  # the same count as the variant compared against, and 2 compiles fewer.
  microbatches_from: str | None = None


# The check as it ran on the H100 (commit bc86cee): whole f32 logits, threefry masks, XLA's remat
# pass free to recompute; residual dropout 0.1 stayed on, attention dropout off (cuDNN).
V0 = {"model.loss_head": "full", "model.dropout_rng": "threefry", "compile.xla_remat": True,
      "model.attention_dropout": 0.0}
V7 = {"model.loss_head": "fused", "model.dropout_rng": "hash", "compile.xla_remat": False,
      "model.dropout": 0.0, "model.attention_dropout": 0.0}
FROM_V0 = {"microbatches_from": "V0"}
VARIANTS = {
    "V0": Variant("the H100 check: full f32 head, threefry, XLA remat on, dropout 0.1", V0,
                  profile=True),
    "V0c": Variant("V0, XLA remat pass off, 1 microbatch, compile only: the true need",
                   {**V0, "compile.xla_remat": False, "optim.microbatches": 1},
                   compile_only=True),
    "V1": Variant("V0 + 2 microbatches", {**V0, "optim.microbatches": 2}),
    "V2": Variant("V0 + dropout 0", {**V0, "model.dropout": 0.0}, **FROM_V0),
    "V3": Variant("V0 + fused head in one chunk (bf16 head backward, whole logits)",
                  {**V0, "model.loss_head": "fused", "model.loss_chunk_tokens": 0}, **FROM_V0),
    "V4": Variant("V0 + fused chunked head", {**V0, "model.loss_head": "fused"}, **FROM_V0),
    "V4h": Variant("V0 + hash dropout masks", {**V0, "model.dropout_rng": "hash"}, **FROM_V0),
    "V5": Variant("V0 + unrolled layers", {**V0, "model.scan_layers": False}, **FROM_V0),
    "V6": Variant("V0 + XLA remat pass off", {**V0, "compile.xla_remat": False}),
    "V7": Variant("fused head, hash masks, remat pass off, no dropout (llm.c-comparable)", V7,
                  profile=True),
    "V8": Variant("V7 + xla_gpu_enable_triton_gemm=False", V7,
                  options={"xla_gpu_enable_triton_gemm": False}, microbatches_from="V7"),
    "R": Variant("paper recipe as configured (dropout 0.1 both; auto: XLA attention)", {}),
    # Unrolled: the config refuses cuDNN's dropout with scanned layers (V5 - V0 is the cost of
    # unrolling by itself).
    "Rc": Variant("R + cuDNN fused attention with dropout, unrolled layers",
                  {"model.attention": "cudnn", "model.scan_layers": False}),
}
ALL = list(VARIANTS) + list(peer.TORCH)
# The most telling first, so a budget cut drops the least (V5 compiles slowest).
RUN_ORDER = ["V0", "V0c", "V7", "V6", "V1", "V3", "V4", "R", "Rc", "V2", "V4h", "V8", "V5"]
NATIVE = ["V0", "V7"]


class InputError(ValueError):
  """Bad command-line input: the one-line message names the value and what is allowed."""


def parse_args(argv=None) -> argparse.Namespace:
  """Flags; unset ones take the full (GPU) or --smoke (CPU) profile's value."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=None, help="Base config (configs/gpt2_117m.py).")
  parser.add_argument("--rows", type=int, default=None, help="Sequences per step (64).")
  parser.add_argument("--seqlen", type=int, default=None, help="Tokens per sequence (1024).")
  parser.add_argument("--steps", type=int, default=None, help="Timed steps per variant (5).")
  parser.add_argument("--variants", default=None, help=f"Comma list of {', '.join(ALL)}.")
  parser.add_argument("--budget_s", type=float, default=None, help="No variant starts that "
                      "would end past this many seconds from start, judged by the last (360).")
  parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_ab")
  parser.add_argument("--smoke", action="store_true", help="Tiny shapes for a CPU.")
  parser.add_argument("--no_need", action="store_true", help="Skip the compile-only need "
                      "with XLA's remat pass off (saves a compile per remat-on variant).")
  # Internal: how the parent starts a pass.
  parser.add_argument("--pass", dest="pass_name", choices=("h100", "native"), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument("--parts_dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--limit_gib", type=float, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--no_profile", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.profile_name = "smoke" if args.smoke else "full"
  profile = SMOKE if args.smoke else FULL
  for key in ("config", "rows", "seqlen", "steps", "budget_s"):
    if getattr(args, key) is None:
      setattr(args, key, profile[key])
  args.explicit = args.variants is not None
  args.variants = ([v.strip() for v in args.variants.split(",") if v.strip()]
                   if args.explicit else list(ALL))
  return args


# ----- configs and input checks -------------------------------------------------------------------

def variant_config(args, variant: Variant, extra: dict | None = None):
  """The validated config of a variant: the check's base (accelerator_check.step_config: bf16,
  one device, no pacing) at the config's own max_seqlen, the profile's model, the overrides,
  then `extra`."""
  base = config_lib.load_config_file(args.config)
  overrides = {"model.max_seqlen": base.model.max_seqlen,
               **(SMOKE if args.smoke else FULL)["model"], **variant.overrides, **(extra or {})}
  return check.step_config(args.config, args.seqlen, args.rows, base.optim.microbatches,
                           overrides)


def check_inputs(args, backend: str) -> dict:
  """Raises InputError for bad input; returns {variant: why} for the variants `backend` lacks
  (cuDNN dropout off a GPU): recorded as not available unless asked for by name."""
  if not os.path.isfile(args.config):
    raise InputError(f"--config={args.config}: no such file (a configs/*.py path)")
  unknown = [v for v in args.variants if v not in ALL]
  if unknown or not args.variants:
    raise InputError(f"--variants={','.join(unknown)}: unknown variant; allowed: "
                     f"{', '.join(ALL)}")
  least = MIN_VARIANT_S[args.profile_name]
  if args.budget_s < least:
    raise InputError(f"--budget_s={args.budget_s:g} is below the {least:g} s one variant needs "
                     f"(minimum {MIN_VARIANT_S['full']:g} s; {MIN_VARIANT_S['smoke']:g} s with "
                     "--smoke)")
  if args.steps < 1:
    raise InputError(f"--steps={args.steps} is invalid: must be >= 1")
  unavailable = {}
  for name in [v for v in args.variants if v in VARIANTS]:
    try:
      c = variant_config(args, VARIANTS[name])
      if c.optim.microbatches != "auto":
        compiled_steps.check_microbatches(c.optim.microbatches, (args.rows, args.seqlen), 1)
      attention.resolve_attention(c.model.attention, c.model.dtype, backend,
                                  c.model.attention_dropout)
    except attention.AttentionError as error:
      if args.explicit:
        raise InputError(f"--variants={name}: {error}") from None
      unavailable[name] = f"not available on {backend}: {error}"
    except errors.ConfigError as error:
      raise InputError(f"--rows={args.rows} --seqlen={args.seqlen} (variant {name}): "
                       f"{error}") from None
  return unavailable


# ----- one variant (inside a pass) ----------------------------------------------------------------

@contextlib.contextmanager
def captured_stderr(sink: list):
  """Appends what is written to file descriptor 2 meanwhile (XLA's C++ warnings included) to
  `sink`, and writes it on to the real stderr afterwards."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      sink.append(tmp.read().decode(errors="replace"))
      sys.stderr.write(sink[-1])
      sys.stderr.flush()


REMAT_WARNING = re.compile(r"[^\n]*Can't reduce memory use below[^\n]*")


def memory_fields(executable) -> dict:
  """The executable's memory analysis in bytes, and `compiled_steps.memory_bytes` (its need)."""
  stats = executable.memory_analysis()
  kinds = ("argument", "output", "temp", "alias", "generated_code")
  fields = {f"{k}_bytes": getattr(stats, f"{k}_size_in_bytes", None) if stats else None
            for k in kinds}
  return {**fields, "bytes": compiled_steps.memory_bytes(executable)}


def need_without_remat(steps, shape: tuple[int, int], microbatches: int) -> dict:
  """Compiles (only) the bucket again with XLA's remat pass off at the same microbatches: what
  the step needs when XLA recomputes nothing to fit."""
  saved, stderr = steps.compiler_options, []
  options = compiled_steps.merge_options(
      saved, {"xla_disable_hlo_passes": compiled_steps.XLA_REMAT_PASS})
  steps.compiler_options = options  # compile_with compiles with the cache's options.
  try:
    with captured_stderr(stderr):
      compiled, stats = steps.compile_with(shape, microbatches)
  finally:
    steps.compiler_options = saved
  return {"compile_s": stats.compile_s, "microbatches": microbatches,
          "compiler_options": options, **memory_fields(compiled),
          "remat_clones": hlo_facts(compiled.as_text() or "")["remat_clones"],
          "xla_remat_warnings": REMAT_WARNING.findall("".join(stderr))}


def compile_variant(args, name: str, c, limit_bytes) -> tuple[dict, dict, str]:
  """(built, row, HLO text): the variant compiled the trainer's way, and what that shows."""
  variant, shape, stderr = VARIANTS[name], (args.rows, args.seqlen), []
  options = compiled_steps.merge_options((SMOKE if args.smoke else FULL)["options"],
                                         variant.options)
  with captured_stderr(stderr):
    built = check.compile_bucket(c, shape, limit_bytes, options)
  stats, options = built["stats"], built["device"].executables.compiler_options
  hlo = built["executable"].as_text() or ""
  m = c.model
  kernel, why = attention.resolve_attention(m.attention, m.dtype,
                                            attention_dropout=m.attention_dropout)
  row = {"change": variant.change, "overrides": variant.overrides, "compiler_options": options,
         "remat_pass_off": compiled_steps.remat_pass_off(options),
         "xla_remat": c.compile.xla_remat, "rows": args.rows, "seqlen": args.seqlen,
         "microbatches": stats.microbatches, "microbatch_line": built["microbatch_line"],
         "compile_s": stats.compile_s, "compile_total_s": built["compile_total_s"],
         "memory": memory_fields(built["executable"]), "attention": kernel,
         "attention_why": why, **hlo_facts(hlo),
         "xla_remat_warnings": REMAT_WARNING.findall("".join(stderr))}
  # Where XLA has no remat pass (a CPU) the need equals the compile: only V0's, as a check.
  has_pass = jax.default_backend() == "gpu" or name == "V0"
  if not args.no_need and c.compile.xla_remat and not row["remat_pass_off"] and has_pass:
    row["need"] = need_without_remat(built["device"].executables, shape, stats.microbatches)
  return built, row, hlo


def profile_or_error(trace_dir: str, hlo: str, trace_error: str | None) -> dict:
  """The trace's summary, or why there is none (a failed trace or read never costs the row)."""
  try:
    if trace_error:
      return {"gpu_events": False, "note": f"no profile: the trace failed: {trace_error}"}
    return summarize_profile(trace_dir, hlo, PROFILE_STEPS)
  except Exception as error:  # pylint: disable=broad-except
    traceback.print_exc()
    return {"gpu_events": False, "note": f"no profile: reading it failed: {error}"}
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)


def run_variant(args, name: str, peaks: dict, limit_bytes, done: dict) -> dict:
  """One variant: compile, then (unless compile-only) time, check and maybe profile its step;
  a failure after the compile (out of memory, say) keeps what the compile showed.
  `done`: the rows so far (a variant may take its microbatch count from one of them)."""
  variant = VARIANTS[name]
  source = (done.get(variant.microbatches_from) or {}).get("microbatches")
  c = variant_config(args, variant, {"optim.microbatches": source} if source else None)
  log(f"{name}: compiling ({variant.change})")
  built, row, hlo = compile_variant(args, name, c, limit_bytes)
  if source:
    row["microbatch_line"] += f" [the count {variant.microbatches_from} chose]"
  log(f"{name}: {row['microbatch_line']}; compiled in {row['compile_s']:.1f} s, needs "
      f"{row['memory']['bytes'] / GIB:.2f} GiB")
  if variant.profile and args.pass_name == "h100":
    with gzip.open(os.path.join(args.out, f"hlo_{name}.txt.gz"), "wt") as f:
      f.write(hlo)
  row["status"] = "compiled"
  try:
    if not variant.compile_only:
      row.update(time_variant(args, variant, c, built, hlo, peaks), status="ok")
      log(f"{name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s")
  except Exception as error:  # pylint: disable=broad-except  (recorded; the matrix goes on)
    traceback.print_exc()
    row.update(status="error", error=one_line(error))
  finally:
    built["device"].executables.close()
    built.clear()
  return row


def time_variant(args, variant: Variant, c, built: dict, hlo: str, peaks: dict) -> dict:
  """Steps, rates and losses of a compiled variant, and its profile when it has one."""
  shape = (args.rows, args.seqlen)
  trace_dir = tempfile.mkdtemp(prefix="gpu_ab_trace_") if (
      variant.profile and not args.no_profile) else None
  timed = check.time_steps(built, shape, c.model.vocab_size, args.steps, trace_dir,
                           PROFILE_STEPS)
  result = {**check.throughput(c, built, timed, shape, peaks), "losses": timed["losses"],
            "loss_finite": all(math.isfinite(x) for x in timed["losses"])}
  if trace_dir:
    result["profile"] = profile_or_error(trace_dir, hlo, timed["trace_error"])
  return result


def one_line(error: BaseException) -> str:
  return " ".join(f"{type(error).__name__}: {error}".split())[:1500]


# ----- passes (child processes) and the merged record ---------------------------------------------

def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_merged(out: str, parts_dir: str) -> dict:
  """gpu_ab.json from the parent's record, each pass's and the torch peer's (atomically)."""
  merged = read_json(os.path.join(parts_dir, "parent.json")) or {}
  merged["passes"] = {n: p for n in ("h100", "native")
                      if (p := read_json(os.path.join(parts_dir, f"pass_{n}.json")))}
  merged["torch"] = read_json(os.path.join(parts_dir, "torch.json")) or {}
  merged["elapsed_s"] = time.perf_counter() - check._START  # pylint: disable=protected-access
  check.write_json_atomic(os.path.join(out, "gpu_ab.json"), merged)
  try:  # The tables too, so that a killed run leaves them; the JSON above is the record.
    with open(os.path.join(out, "gpu_ab.md.tmp"), "w") as f:
      f.write("\n".join(render(merged, VARIANTS)) + "\n")
    os.replace(os.path.join(out, "gpu_ab.md.tmp"), os.path.join(out, "gpu_ab.md"))
  except Exception:  # pylint: disable=broad-except  (a table bug must not stop the matrix)
    traceback.print_exc()
  return merged


def pass_limit(args, env: dict) -> tuple[int | None, str]:
  """The memory limit microbatches are chosen against in this pass, and a note on it."""
  limit = env["device_memory_limit"]
  if args.limit_gib is None:
    return limit, "default memory fraction" if limit else "no allocator limit (cpu)"
  cap = int(args.limit_gib * GIB)
  if not limit:
    return None, f"the {args.limit_gib} GiB cap does not apply here: no allocator limit (cpu)"
  return min(limit, cap), (f"allocator limit {limit / GIB:.2f} GiB (fraction "
                           f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}), microbatches "
                           f"chosen against {min(limit, cap) / GIB:.2f} GiB")


def cudnn_probe(script: str = os.path.join(HERE, "cudnn_dropout_probe.py")) -> dict:
  """benchmarks/cudnn_dropout_probe.py's findings: whether cuDNN's attention dropout (Rc) drops
  what it should (a few small compiles; {"available": False, ...} off a GPU).

  In a child process: on jax 0.11.2 (H200, CUDA 13) the probe killed the whole pass with XLA's
  `Check failed: local_device_ordinal.has_value()` (cuDNN graph in a command buffer), a crash
  no `except` can catch. The child does not preallocate: this pass's backend holds its share."""
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    done = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=240, env=env, check=False)
  except subprocess.TimeoutExpired:
    return {"available": False, "why": "the probe ran past 240 s"}
  lines = done.stdout.strip().splitlines()
  if done.returncode == 0 and lines:
    return json.loads(lines[-1])
  sys.stderr.write(done.stderr[-4000:])
  failed = [line for line in done.stderr.splitlines() if "Check failed" in line or "Error" in line]
  return {"available": False, "why": f"the probe exited with status {done.returncode}: "
          + (failed[-1].strip() if failed else "no error line")}


def run_pass(args) -> int:
  """One pass in this process: every requested variant in RUN_ORDER within --budget_s,
  recorded in parts_dir/pass_<name>.json and the merged gpu_ab.json after each."""
  if (SMOKE if args.smoke else FULL)["cache"]:
    hardware.enable_compilation_cache(os.path.join(args.parts_dir, "jax_cache"))
  record = {"pass": args.pass_name, "variants": {}}
  path = os.path.join(args.parts_dir, f"pass_{args.pass_name}.json")

  def save():
    check.write_json_atomic(path, record)
    write_merged(args.out, args.parts_dir)

  record["environment"] = env = check.environment()
  limit, record["limit_note"] = pass_limit(args, env)
  record["limit_bytes"] = limit
  log(f"pass {args.pass_name}: {env['backend']} {env['device_kind']}; {record['limit_note']}")
  try:
    record["matmul"] = check.matmul_rate((SMOKE if args.smoke else FULL)["matmul_n"])
  except Exception as error:  # pylint: disable=broad-except
    record["matmul"] = {"error": f"{type(error).__name__}: {error}"}
  peaks = {"datasheet": env["datasheet_bf16_peak"], "matmul": record["matmul"].get("flops_per_s")}
  if args.pass_name == "h100":
    record["cudnn_dropout_probe"] = cudnn_probe()
  save()
  last_s = 0.0
  for name in [n for n in RUN_ORDER if n in args.variants]:
    elapsed = time.perf_counter() - check._START  # pylint: disable=protected-access
    if elapsed + last_s > args.budget_s:
      record["variants"][name] = {"change": VARIANTS[name].change, "status": "skipped",
                                  "error": f"skipped: {elapsed:.0f} s + the "
                                  f"last variant's {last_s:.0f} s would pass this pass's budget "
                                  f"of {args.budget_s:.0f} s"}
      log(f"{name}: {record['variants'][name]['error']}")
      save()
      continue
    start = time.perf_counter()
    try:
      row = run_variant(args, name, peaks, limit, record["variants"])
    except Exception as error:  # pylint: disable=broad-except  (a compile failure: go on)
      traceback.print_exc()
      row = {"change": VARIANTS[name].change, "status": "error", "error": one_line(error)}
    if row.get("error"):
      log(f"{name}: {row['error'][:300]}")
    jax.clear_caches()  # Frees this variant's executables before the next compiles.
    gc.collect()
    last_s = row["wall_s"] = time.perf_counter() - start
    record["variants"][name] = row
    save()
  return 0


# ----- the parent: device facts, passes, the torch peer ------------------------------------------

def device_facts() -> dict:
  """The backend and GPU memory, found without starting JAX here: JAX_PLATFORMS=cpu, else
  nvidia-smi, else a probe subprocess (which does start JAX, without preallocating)."""
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return {"backend": "cpu", "usable_bytes": None, "how": "JAX_PLATFORMS=cpu"}
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,"
                          "nounits"], capture_output=True, text=True, timeout=30, check=True)
    total = int(out.stdout.split()[0]) * 2**20
    return {"backend": "gpu", "total_bytes": total, "usable_bytes": total - CUDA_RESERVE,
            "how": "nvidia-smi memory.total less CUDA_RESERVE"}
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    pass
  probe = ("import json, jax; d = jax.devices()[0]; print(json.dumps({'backend': "
           "jax.default_backend(), 'usable_bytes': (d.memory_stats() or {}).get('bytes_limit')}))")
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
             XLA_PYTHON_CLIENT_MEM_FRACTION="1.0")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=300, env=env, check=False)
  facts = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
      "backend": "cpu", "usable_bytes": None}
  return {**facts, "how": "probe subprocess (bytes_limit at fraction 1.0)"}


def h100_fraction(facts: dict) -> tuple[float | None, str]:
  """XLA_PYTHON_CLIENT_MEM_FRACTION giving this device the H100's 71.26 GiB allocator limit,
  or None (and why) where it does not apply: a CPU, or a GPU whose default limit is no larger."""
  usable = facts.get("usable_bytes")
  if facts["backend"] != "gpu" or not usable:
    return None, f"the 71.26 GiB H100 cap does not apply on {facts['backend']}: no allocator limit"
  if usable * hardware.GPU_MEMORY_FRACTION <= H100_LIMIT * 1.01:
    return None, (f"{usable / GIB:.1f} GiB usable: the default fraction already gives at most "
                  "the H100's limit, so the native pass is the same and is skipped")
  return H100_LIMIT / usable, (f"XLA_PYTHON_CLIENT_MEM_FRACTION={H100_LIMIT / usable:.4f} of "
                               f"{usable / GIB:.2f} GiB usable for the H100's 71.26 GiB")


def start_pass(args, name: str, variants: list, budget_s: float, fraction) -> int:
  """Runs one pass as a child process of this script; returns its exit status."""
  env = dict(os.environ)
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)  # The native pass: the trainer's default.
  if fraction is not None:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
  command = [sys.executable, os.path.abspath(__file__), f"--pass={name}",
             f"--config={args.config}", f"--rows={args.rows}", f"--seqlen={args.seqlen}",
             f"--steps={args.steps}", f"--variants={','.join(variants)}",
             f"--budget_s={budget_s:.0f}", f"--out={args.out}", f"--parts_dir={args.parts_dir}"]
  command += ["--smoke"] * args.smoke + ["--no_need"] * (args.no_need or name == "native")
  command += ["--no_profile"] * (name == "native")
  command += [f"--limit_gib={H100_LIMIT / GIB}"] if name == "h100" else []
  log(f"pass {name}: {', '.join(variants)} within {budget_s:.0f} s")
  return subprocess.run(command, env=env, check=False).returncode


def run_passes(args, parent: dict, unavailable: dict, save):
  """The h100 pass (always: the budget was checked to hold one variant), then the native pass
  if its share of the budget still holds one; exit statuses into parent["pass_status"]."""
  profile, fraction = (SMOKE if args.smoke else FULL), parent["h100_fraction"]
  variants = [v for v in args.variants if v in VARIANTS and v not in unavailable]
  native = [v for v in NATIVE if v in variants]
  passes = [("h100", variants, profile["reserve_native_s"] + profile["reserve_torch_s"])]
  # A GPU that needs no cap ran the h100 pass at its native limit already.
  if native and (fraction is not None or parent["device"]["backend"] != "gpu"):
    passes.append(("native", native, profile["reserve_torch_s"]))
  least = MIN_VARIANT_S[args.profile_name]
  for name, names, reserve in passes:
    elapsed = time.perf_counter() - check._START  # pylint: disable=protected-access
    budget = args.budget_s - reserve - elapsed
    if not names or (name == "native" and budget < least):
      parent["pass_status"][name] = (f"skipped: {max(budget, 0):.0f} s of its budget left"
                                     if names else "skipped: no variant")
      continue
    parent["pass_status"][name] = start_pass(args, name, names, max(least, budget),
                                             fraction if name == "h100" else None)
    save()


def orchestrate(args) -> int:
  """The parent: checks the input, runs the h100 pass, the native pass, the torch peer, then
  writes gpu_ab.md. Exit status 2 on bad input, 1 when a pass crashed, else 0."""
  facts = device_facts()
  try:
    unavailable = check_inputs(args, facts["backend"])
  except InputError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  os.makedirs(args.out, exist_ok=True)
  args.parts_dir = tempfile.mkdtemp(prefix="gpu_ab_parts_")
  fraction, cap_note = h100_fraction(facts)
  parent = {"args": {k: v for k, v in vars(args).items() if k != "parts_dir"}, "device": facts,
            "cap_note": cap_note, "h100_fraction": fraction, "not_available": unavailable,
            "pass_status": {}}
  torch_rows = {}

  def save():
    check.write_json_atomic(os.path.join(args.parts_dir, "parent.json"), parent)
    check.write_json_atomic(os.path.join(args.parts_dir, "torch.json"), torch_rows)
    return write_merged(args.out, args.parts_dir)

  save()
  log(f"device: {facts}; {cap_note}")
  run_passes(args, parent, unavailable, save)
  model = variant_config(args, VARIANTS["V7"]).model
  peer.run_torch_peers(args, model, (SMOKE if args.smoke else FULL)["torch_compile"],
                       torch_rows, save)
  parent["parent_started_jax"] = backends_started()
  print("\n" + "\n".join(render(save(), VARIANTS)), flush=True)
  shutil.rmtree(args.parts_dir, ignore_errors=True)
  return 1 if any(isinstance(v, int) and v for v in parent["pass_status"].values()) else 0


def backends_started() -> bool:
  """Whether this process started a JAX backend (the parent must not: it would hold GPU memory
  while the passes run)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return bool(getattr(xla_bridge, "_backends", {}))


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.pass_name:
    hardware.use_gpu_memory_fraction()  # The trainer's default unless the parent set one.
    return run_pass(args)
  return orchestrate(args)


if __name__ == "__main__":
  sys.exit(main())
