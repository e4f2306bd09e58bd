"""The tables of benchmarks/gpu_ab.py: gpu_ab.md, rendered from the merged record.

What: `render(merged, variants)` turns the record of gpu_ab.json into markdown lines: a header,
one table per pass (a row per variant, deltas against V0's step, the microbatch choices, the
cuDNN dropout probe), the profiles by category and top op, the gemm operand dtypes, and the
PyTorch peer with the JAX/torch tokens/s ratios.

Why separate: it only reads the record (never JAX, a device or a pass), so that gpu_ab.py can
rewrite the tables after every variant and tests can check them on hand-made records. The
matrix's variants (their order and descriptions, gpu_ab.VARIANTS) come in as `variants`, so that
this module does not import the script that imports it.
"""

from __future__ import annotations

import re

import accelerator_check as check
from gpu_ab_hlo import PROFILE_STEPS

GIB = 2**30

_fmt = check._fmt  # pylint: disable=protected-access


def _cell(text) -> str:
  return " ".join(str(text).split()).replace("|", "/")


def _warning(row: dict) -> str:
  found = [re.search(r"below ([\d.]+\s*\w+)", w) for w in row.get("xla_remat_warnings", [])]
  return f"below {found[0].group(1)}" if found and found[0] else "-"


def variant_line(name: str, row: dict, base_ms) -> str:
  """One row of a pass's table: the variant's numbers and deltas against V0's step."""
  if "memory" not in row:  # Not compiled: skipped, not available, or the compile failed.
    why = _cell(row.get("error", ""))
    why = why if why.startswith(row.get("status", "")) else f"{row.get('status')}: {why}"
    return f"| {name} | {_cell(row.get('change', ''))} | {why[:240]} |"
  need = (row.get("need") or {}).get("bytes")
  if need is None and not row.get("xla_remat", True):
    need = row["memory"]["bytes"]  # Compiled with the pass off (or none exists): its own need.
  step, delta = row.get("step_ms"), None
  if step is not None and base_ms:
    delta = step - base_ms
  steps = "compile only" if step is None else f"{step:.1f} / {row['step_min_ms']:.1f}"
  if row.get("status") == "error":
    steps = f"error: {_cell(row['error'])[:160]}"
  clones = f"{row['remat_clones']}" + (f" ({row['need']['remat_clones']} off)"
                                       if row.get("need") else "")
  return (f"| {name} | {_cell(row['change'])} | {row['microbatches']} | {row['compile_s']:.1f} | "
          f"{row['memory']['bytes'] / GIB:.2f} | {_fmt(need, '.2f', 1 / GIB)} | {steps} | "
          f"{_fmt(delta, '+.1f')} | {_fmt(delta / base_ms if delta is not None else None, '+.1%')}"
          f" | {_fmt(row.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('mfu_datasheet'), '.1%')} | "
          f"{_fmt(row.get('mfu_measured_matmul'), '.1%')} | {row['cudnn_fmha_calls']} | {clones} | "
          f"{_warning(row)} | {row.get('loss_finite', '-')} |")


def pass_lines(name: str, record: dict, not_available: dict, variants: dict) -> list[str]:
  """A pass's table, the probe and the microbatch choices; `variants`: gpu_ab.VARIANTS."""
  env, mm = record.get("environment") or {}, record.get("matmul") or {}
  rate = f"{mm['flops_per_s'] / 1e12:.1f} TFLOP/s" if "flops_per_s" in mm else mm.get("error")
  lines = [f"## Pass {name}: {env.get('device_kind')}, {record.get('limit_note')}; bf16 matmul "
           f"{mm.get('n')}^3 {rate}", "",
           "| variant | change | microbatches | compile s | memory GiB | need GiB (remat pass off) "
           "| step ms (median / min) | vs V0 ms | vs V0 % | tokens/s | MFU datasheet | MFU vs "
           "matmul | cuDNN fmha calls | remat clones | XLA remat warning | losses finite |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
  rows = dict(record.get("variants", {}))
  if name == "h100":
    rows.update({n: {"status": "not available", "change": variants[n].change, "error": why}
                 for n, why in not_available.items()})
  base_ms = (rows.get("V0") or {}).get("step_ms")
  lines += [variant_line(n, rows[n], base_ms) for n in variants if n in rows]
  if "cudnn_dropout_probe" in record:
    lines += ["", probe_line(record["cudnn_dropout_probe"])]
  lines += ["", "Microbatch choice per variant (compiled_steps.choose_microbatches):"]
  lines += [f"- {n}: {rows[n]['microbatch_line']}" for n in variants
            if rows.get(n, {}).get("microbatch_line")]
  return lines + [""]


def probe_line(found: dict) -> str:
  """The cuDNN dropout probe in a sentence, with what each number should be."""
  if not found.get("available"):
    return f"cuDNN dropout probe (Rc's kernel): not available: {_cell(found.get('why'))}"
  rate = found["rate"]
  independent = (1 - rate) ** 2 + rate**2  # Agreement of two independent masks.
  return (f"cuDNN dropout probe (Rc's kernel, rate {rate}): kept fraction "
          f"{found['kept_fraction']:.3f} (want {1 - rate:.3f}); same mask on the next call "
          f"{found['same_mask_next_call']:.3f} and in another call of the program "
          f"{found['same_mask_other_call_in_program']:.3f} (independent masks: "
          f"{independent:.3f}; 1.000: the mask never changes); dV error against the forward's "
          f"mask {found['dv_relative_error_vs_forward_mask']:.4f} (want bf16 rounding, ~0.01); "
          f"between devices: {found['between_devices']}")


def profile_lines(passes: dict) -> list[str]:
  """Per profiled variant: device time by category and the top ops with their source lines."""
  lines = []
  for pass_name, record in passes.items():
    for name, row in record.get("variants", {}).items():
      prof = row.get("profile")
      if not prof:
        continue
      lines += [f"## Profile of {name} ({pass_name} pass, {PROFILE_STEPS} steps)", ""]
      if not prof.get("gpu_events"):
        lines += [prof["note"], ""]
        continue
      lines += [f"Device time {prof['device_ms_per_step']:.1f} ms/step summed over streams (step "
                f"{_fmt(row.get('step_ms'), '.1f')} ms wall); kernels not mapped to an HLO "
                f"instruction: {prof['unmapped_ms_per_step']:.1f} ms/step.", "",
                "| category | ms/step | share |", "|---|---:|---:|"]
      total = prof["device_ms_per_step"] or 1.0
      lines += [f"| {k} | {v:.2f} | {v / total:.1%} |" for k, v in prof["categories"].items()]
      lines += ["", "| # | op | kernel | category | ms/step | share | calls/step | source |",
                "|---:|---|---|---|---:|---:|---:|---|"]
      lines += [f"| {i} | {_cell(o['op'])[:60]} | {_cell(o['kernel'])[:50]} | {o['category']} | "
                f"{o['ms_per_step']:.2f} | {o['share']:.1%} | {o['calls_per_step']:.1f} | "
                f"{_cell(o['source'])[:100]} |" for i, o in enumerate(prof["top"], 1)]
      lines.append("")
  return lines


def dtype_lines(record: dict, variants: dict) -> list[str]:
  """Gemm operand dtypes of each variant's compiled HLO: static count (GFLOP) per kind, in the
  order of `variants` (gpu_ab.VARIANTS)."""
  rows = {n: r for n, r in record.get("variants", {}).items() if r.get("gemms")}
  names = [n for n in variants if n in rows]
  keys = sorted({(g["kind"], g["lhs"], g["rhs"], g["out"]) for r in rows.values()
                 for g in r["gemms"]})
  lines = ["## Gemm operand dtypes in the compiled HLO (static: a scanned loop body counts once; "
           "count and static GFLOP)", "",
           "| gemm | lhs x rhs -> out | " + " | ".join(names) + " |",
           "|---|---|" + "---:|" * len(names)]
  for key in keys:
    cells = []
    for n in names:
      g = next((g for g in rows[n]["gemms"] if (g["kind"], g["lhs"], g["rhs"], g["out"])
                == key), None)
      cells.append(f"{g['count']} ({g['gflop_static']:.3g})" if g else "-")
    lines.append(f"| {key[0]} | {key[1]} x {key[2]} -> {key[3]} | " + " | ".join(cells) + " |")
  return lines + [""]


def torch_lines(merged: dict) -> list[str]:
  """The torch peer's rows and the JAX/torch tokens/s ratios."""
  rows = merged.get("torch") or {}
  if not rows:
    return []
  matmul = ((merged.get("passes", {}).get("h100") or {}).get("matmul") or {}).get("flops_per_s")
  lines = ["## PyTorch peer (benchmarks/torch_peer.py, same shapes)", "",
           "| run | change | step ms (median / min) | tokens/s | MFU datasheet | MFU vs matmul "
           "(h100 pass's) | losses finite | torch, device, compile |",
           "|---|---|---:|---:|---:|---:|---|---|"]
  for name, r in rows.items():
    if r.get("status") != "ok":
      lines.append(f"| {name} | {_cell(r['change'])} | {r['status']}: "
                   f"{_cell(r.get('error'))[:240]} |")
      continue
    res = r["result"]
    lines.append(f"| {name} | {_cell(r['change'])} | {r['step_ms']:.1f} / {r['step_min_ms']:.1f}"
                 f" | {r['tokens_per_s']:,.0f} | {_fmt(r['mfu_datasheet'], '.1%')} | "
                 f"{_fmt(r['model_flops_per_s'] / matmul if matmul else None, '.1%')} | "
                 f"{r['loss_finite']} | {res.get('torch_version')}, {res.get('device_name')}, "
                 f"compile {res.get('compile')} |")
  lines.append("")
  for jax_name, torch_name in (("V7", "T"), ("R", "T_R")):
    theirs = (rows.get(torch_name) or {}).get("tokens_per_s")
    for pass_name, record in merged.get("passes", {}).items():
      ours = (record.get("variants", {}).get(jax_name) or {}).get("tokens_per_s")
      if ours and theirs:
        lines.append(f"- torch ratio: {jax_name} ({pass_name} pass) / {torch_name} tokens/s = "
                     f"{ours / theirs:.2f}x")
  return lines + [""]


def _device_text(facts: dict) -> str:
  usable = facts.get("usable_bytes")
  return f"{facts.get('backend')}" + (f", {usable / GIB:.2f} GiB usable" if usable else "") + \
      f" ({facts.get('how')})"


def render(merged: dict, variants: dict) -> list[str]:
  """gpu_ab.md: header, one table per pass, profiles, gemm dtypes, the torch peer.

  Args:
    merged: the record of gpu_ab.json.
    variants: name -> variant (its `.change`) in table order: gpu_ab.VARIANTS.
  """
  a, passes = merged.get("args", {}), merged.get("passes", {})
  lines = [f"# GPU A/B matrix (benchmarks/gpu_ab.py{' --smoke' if a.get('smoke') else ''}): "
           f"{a.get('rows')} x {a.get('seqlen')} tokens, {a.get('steps')} timed steps after "
           f"{check.WARMUP_STEPS} warm-up", "",
           f"Device: {_device_text(merged.get('device') or {})}. Cap: "
           f"{merged.get('cap_note')}. Elapsed "
           f"{merged.get('elapsed_s', 0):.0f} s; pass exit status {merged.get('pass_status')}.",
           ""]
  for name, record in passes.items():
    lines += pass_lines(name, record, merged.get("not_available") or {}, variants)
  lines += profile_lines(passes)
  if passes:
    lines += dtype_lines(passes.get("h100") or next(iter(passes.values())), variants)
  return lines + torch_lines(merged)
