"""The PyTorch peer of benchmarks/gpu_ab.py: benchmarks/torch_peer.py at the matrix's shapes.

Separate from gpu_ab.py (which it serves) to keep each file readable: the peer runs in its own
process after the JAX passes (JAX preallocates GPU memory), and its JSON line becomes a row of
the same tables, so the comparison is a ratio measured in the same device call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import accelerator_check as check  # pylint: disable=import-error (benchmarks/ is on sys.path)

from slw_jax import hardware

TORCH_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")
log = check.log
TORCH = {"T": (0.0, "PyTorch peer, dropout 0 (compare with V7)"),
         "T_R": (0.1, "PyTorch peer, dropout 0.1 both (compare with R)")}


def torch_row(name: str, result: dict, wall_s: float) -> dict:
  """The torch peer's JSON line (benchmarks/torch_peer.py `measure`) as a table row."""
  dropout, change = TORCH[name]
  median = result.get("step_s_median")
  peaks = hardware.datasheet_peak(result.get("device_name") or "")
  flops = result.get("model_flops_per_s")
  return {"change": change, "dropout": dropout, "wall_s": wall_s,
          "status": "error" if "error" in result else "ok", "error": result.get("error"),
          "step_ms": median * 1e3 if median else None,
          "step_min_ms": result["step_s_min"] * 1e3 if result.get("step_s_min") else None,
          "tokens_per_s": result.get("tokens_per_s"), "model_flops_per_s": flops,
          "mfu_datasheet": flops / peaks[0] if flops and peaks else None,
          "loss_finite": result.get("losses_finite"), "result": result}


def run_torch(args, model, compile_torch: bool, name: str, timeout_s: float) -> dict:
  """The PyTorch peer at the matrix's shapes in its own process (after the JAX passes: JAX
  preallocates GPU memory); dropout and attention dropout both TORCH[name]'s."""
  if importlib.util.find_spec("torch") is None:
    return {"change": TORCH[name][1], "status": "not available",
            "error": "not available: torch is not importable"}
  m = model
  dropout = TORCH[name][0]
  command = [sys.executable, TORCH_PEER]
  for flag, value in (("n_layer", m.n_layer), ("d_model", m.d_model), ("n_head", m.n_head),
                      ("vocab_size", m.vocab_size), ("max_seqlen", m.max_seqlen),
                      ("vocab_pad_multiple", m.vocab_pad_multiple), ("rows", args.rows),
                      ("seqlen", args.seqlen), ("steps", args.steps),
                      ("warmup", check.WARMUP_STEPS), ("dropout", dropout),
                      ("attention_dropout", dropout)):
    command += [f"--{flag}", str(value)]
  command += [] if compile_torch else ["--no_compile"]
  log(f"{name}: {' '.join(command[1:])}")
  start = time.perf_counter()
  try:
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout_s,
                          check=False)
  except subprocess.TimeoutExpired:
    return {"change": TORCH[name][1], "status": "error",
            "error": f"timed out after {timeout_s:.0f} s", "wall_s": timeout_s}
  lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
  result = json.loads(lines[-1]) if lines else {}
  if done.returncode and "error" not in result:
    result["error"] = f"torch_peer exited {done.returncode} (its stderr is above)"
  return torch_row(name, result, time.perf_counter() - start)


def run_torch_peers(args, model, compile_torch: bool, rows: dict, save):
  """T unless the budget is spent (the passes kept its reserve), then T_R if the time T took
  still fits."""
  last_s = 0.0
  for name in [n for n in TORCH if n in args.variants]:
    elapsed = time.perf_counter() - check._START  # pylint: disable=protected-access
    if elapsed + last_s > args.budget_s:
      rows[name] = {"change": TORCH[name][1], "status": "skipped",
                    "error": f"skipped: {elapsed:.0f} s + the last peer's {last_s:.0f} s would "
                             f"pass --budget_s={args.budget_s:.0f}"}
    else:
      # Bounded so the run ends inside the device call (--budget_s + ~100 s).
      timeout_s = min(3600.0, max(150.0, args.budget_s - elapsed + 100))
      rows[name] = run_torch(args, model, compile_torch, name, timeout_s)
      last_s = rows[name].get("wall_s") or 0.0
    log(f"{name}: {rows[name].get('error') or rows[name]['status']}")
    save()
