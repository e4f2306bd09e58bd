"""The readers of benchmarks/gpu_ab.py: compiled HLO text and `jax.profiler` traces.

What: `parse_hlo` (every instruction of an HLO module's text by name), `gemm_table` (gemms by
kind and operand dtypes, static count and GFLOP), `hlo_facts` (those gemms, cuDNN fmha calls,
remat clones), `source_of` (an op's file:line from its metadata), and the profile: the device
events of a trace (`device_events`, read with JAX's own ProfileData) summarized per step by
category and top ops with their source lines (`summarize_profile`).

Why separate: these are pure functions of text and traces, tested on GPU-shaped input on a CPU
(tests/test_gpu_ab.py) without running the matrix; gpu_ab.py runs the matrix and
gpu_ab_tables.py prints it. This module imports neither.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re

import jax

# Steps traced per profiled variant (gpu_ab.py traces them; the tables name them).
PROFILE_STEPS = 3

# ----- HLO text -----------------------------------------------------------------------------------

DTYPE = r"(?:pred|[su](?:4|8|16|32|64)|f16|bf16|f32|f64|f8e\w+|c64|c128)"
SHAPE = re.compile(rf"\b({DTYPE})\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
OPCODE = re.compile(r"([a-z][\w\-]*)\(")


@dataclasses.dataclass
class Instruction:
  name: str
  computation: str
  out_type: str
  opcode: str
  operands: str
  attrs: str


def _closing(text: str, start: int) -> int:
  """Index just past the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def parse_hlo(text: str) -> dict[str, Instruction]:
  """Every instruction of an HLO module's text by name (its computation, output type, opcode,
  operand text and attributes)."""
  index, computation = {}, ""
  for line in text.splitlines():
    match = INSTRUCTION.match(line)
    if not match or " = " not in line:
      if line.rstrip().endswith("{"):
        computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    name, rest = match.groups()
    end = _closing(rest, 0) if rest.startswith("(") else rest.find(" ")
    out_type, rest = rest[:end], rest[end:]
    op = OPCODE.search(rest)
    if not op:
      continue
    close = _closing(rest, op.end() - 1)
    index[name] = Instruction(name, computation, out_type, op.group(1),
                              rest[op.end():close - 1], rest[close:])
  return index


def _attr(ins: Instruction, pattern: str) -> str:
  match = re.search(pattern, ins.attrs)
  return match.group(1) if match else ""


CALLS = re.compile(r"\b(?:calls|body|condition|to_apply|branch_computations|true_computation|"
                   r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)")


def called(ins: Instruction) -> list[str]:
  """The computations an instruction calls (fusions, loops, conditionals, reductions)."""
  return [n for group in CALLS.findall(ins.attrs) for n in re.findall(r"%?([\w.\-]+)", group)]


def _triton_computations(index: dict) -> set[str]:
  """Computations inside triton gemm fusions (their dots run as triton kernels)."""
  todo = [c for ins in index.values() if ins.opcode == "fusion" and "triton" in ins.attrs
          and "gemm" in ins.attrs for c in called(ins)]
  calls = {}
  for ins in index.values():
    calls.setdefault(ins.computation, []).extend(called(ins))
  seen = set()
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(calls.get(name, []))
  return seen


def _operand_shapes(ins: Instruction, index: dict) -> list[tuple[str, list[int]]]:
  shapes = SHAPE.findall(ins.operands)
  if len(shapes) < 2:  # Operands printed without types: look their definitions up.
    shapes = [SHAPE.findall(index[n].out_type)[0] for n in re.findall(r"%([\w.\-]+)", ins.operands)
              if n in index and SHAPE.findall(index[n].out_type)]
  return [(d, [int(x) for x in dims.split(",") if x]) for d, dims in shapes]


def gemm_kind(ins: Instruction, triton: set) -> str | None:
  target = _attr(ins, r'custom_call_target="([^"]+)"')
  if ins.opcode == "custom-call" and "__cublas" in target:
    return "cublasLt" if "$lt$" in target else "cublas"
  if ins.opcode == "dot":
    return "triton gemm" if ins.computation in triton else "dot"
  return None


def gemm_table(index: dict) -> list[dict]:
  """Gemms of the compiled HLO by (kind, lhs dtype, rhs dtype, output dtype): static count
  (a scanned loop's body counts once) and static GFLOP."""
  triton, rows = _triton_computations(index), {}
  for ins in index.values():
    kind = gemm_kind(ins, triton)
    if kind is None:
      continue
    operands = _operand_shapes(ins, index)
    out = SHAPE.findall(ins.out_type)
    if len(operands) < 2 or not out:
      continue
    contracting = (_attr(ins, r"lhs_contracting_dims=\{([\d,]*)\}") or
                   _attr(ins, r'"lhs_contracting_dimensions":\[([^\]]*)\]'))
    depth = math.prod(operands[0][1][int(d.strip('" '))] for d in contracting.split(",")
                      if d.strip('" '))
    out_size = math.prod(int(x) for x in out[0][1].split(",") if x)
    key = (kind, operands[0][0], operands[1][0], out[0][0])
    row = rows.setdefault(key, {"kind": kind, "lhs": key[1], "rhs": key[2], "out": key[3],
                                "count": 0, "gflop_static": 0.0})
    row["count"] += 1
    row["gflop_static"] += 2.0 * out_size * depth / 1e9
  return sorted(rows.values(), key=lambda r: (r["kind"], r["lhs"], r["rhs"], r["out"]))


def hlo_facts(text: str) -> dict:
  """What the compiled HLO says: gemm dtypes, cuDNN fmha calls by target, remat clones."""
  index = parse_hlo(text)
  fmha = {}
  for ins in index.values():
    target = _attr(ins, r'custom_call_target="([^"]+)"')
    if "__cudnn$fmha" in target:
      fmha[target] = fmha.get(target, 0) + 1
  remat = sorted(n for n in index if ".remat" in n)
  return {"gemms": gemm_table(index), "cudnn_fmha": fmha,
          "cudnn_fmha_calls": sum(fmha.values()), "remat_clones": len(remat),
          "remat_clone_names": remat[:20], "hlo_instructions": len(index)}


def source_of(name: str, index: dict) -> str:
  """file:line (op name) of an instruction's metadata, else of the first instruction with one
  in a computation it calls."""
  todo, seen = [index[name]] if name in index else [], set()
  while todo:
    ins = todo.pop(0)
    line = _attr(ins, r"source_line=(\d+)")
    if line:
      where = os.path.basename(_attr(ins, r'source_file="([^"]*)"'))
      op = _attr(ins, r'op_name="([^"]*)"').rsplit("/", 2)[-2:]
      return f"{where}:{line} ({'/'.join(op)})"
    for comp in called(ins):
      if comp not in seen:
        seen.add(comp)
        todo.extend(i for i in index.values() if i.computation == comp)
  return "-"


# ----- profile ------------------------------------------------------------------------------------

CATEGORIES = (  # First match wins: a descriptor of opcode, custom-call target, fusion kind, names.
    ("collectives", r"all-reduce|all-gather|reduce-scatter|collective|all-to-all|nccl|"
                    r"all_reduce|all_gather|reduce_scatter"),
    ("cuDNN attention", r"fmha|cudnn|flash|sdpa"),
    ("gemm", r"cublas|gemm|cutlass|xmma|nvjet|matmul|\bdot\b|convolution"),
    # Slices and concatenations too: the q/k/v slices and the dqkv concat around cuDNN.
    ("copies/transposes", r"copy|transpose|memcpy|memset|slice|concatenate"),
    ("reduction/input fusion", r"kInput|reduce|input_"),
    ("elementwise/loop fusion", r"kLoop|loop_|fusion|elementwise"),
)
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope",
                 "Source code", "XLA TraceMe", "Launch Stats")


def category(ins: Instruction | None, kernel: str) -> str:
  descriptor = kernel.lower()
  if ins is not None:
    descriptor = " ".join([ins.opcode, ins.name, _attr(ins, r'custom_call_target="([^"]+)"'),
                           _attr(ins, r"kind=(k\w+)"), _attr(ins, r'"kind":"(\w+)"'),
                           descriptor])
  for name, pattern in CATEGORIES:
    if re.search(pattern, descriptor):
      return name
  return "other"


def device_events(data) -> tuple[list[dict], list[str]]:
  """([{name, hlo_op, ns}], plane names) of a ProfileData's device planes: kernel lines
  ("Stream #...") where there are any, else every line but the derived ones."""
  events, planes = [], []
  for plane in data.planes:
    planes.append(plane.name)
    if not plane.name.startswith("/device:"):
      continue
    lines = [ln for ln in plane.lines if ln.name not in DERIVED_LINES]
    streams = [ln for ln in lines if ln.name.startswith("Stream")]
    for line in streams or lines:
      for event in line.events:
        stats = dict(event.stats)
        hlo_op = stats.get("hlo_op")
        if hlo_op is None:  # Some versions keep only the annotation string.
          found = re.search(r"hlo_op=([^,#\s]+)", " ".join(str(v) for v in stats.values()))
          hlo_op = found.group(1) if found else None
        events.append({"name": event.name, "hlo_op": hlo_op, "ns": event.duration_ns})
  return events, planes


def _instruction_of(event: dict, index: dict) -> Instruction | None:
  """The HLO instruction of a kernel: its hlo_op stat, else its kernel name (XLA names a
  fusion's kernel after it, '.' -> '_'; inside a command buffer hlo_op is the buffer's)."""
  kernel = event["name"]
  for name in (event["hlo_op"], kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if name and name in index:
      return index[name]
  return None


def summarize_events(events: list[dict], hlo_text: str, steps: int, top: int = 15) -> dict:
  """Device time per step by category and the `top` ops (with source lines) of these events."""
  index, ops, total = parse_hlo(hlo_text), {}, 0.0
  for event in events:
    ins = _instruction_of(event, index)
    key = ins.name if ins else event["name"]
    op = ops.setdefault(key, {"op": key, "category": category(ins, event["name"]), "ns": 0.0,
                              "calls": 0, "mapped": ins is not None,
                              "kernel": event["name"][:80]})
    op["ns"] += event["ns"]
    op["calls"] += 1
    total += event["ns"]
  by_category = {}
  for op in ops.values():
    by_category[op["category"]] = by_category.get(op["category"], 0.0) + op["ns"]
  ranked = sorted(ops.values(), key=lambda o: -o["ns"])[:top]
  return {"gpu_events": True, "steps": steps, "events": len(events),
          "device_ms_per_step": total / steps / 1e6,
          "categories": {k: v / steps / 1e6 for k, v in
                         sorted(by_category.items(), key=lambda kv: -kv[1])},
          "unmapped_ms_per_step": sum(o["ns"] for o in ops.values()
                                      if not o["mapped"]) / steps / 1e6,
          "top": [{"op": o["op"], "category": o["category"], "kernel": o["kernel"],
                   "ms_per_step": o["ns"] / steps / 1e6, "calls_per_step": o["calls"] / steps,
                   "share": o["ns"] / total if total else 0.0,
                   "source": source_of(o["op"], index)} for o in ranked]}


def summarize_profile(trace_dir: str, hlo_text: str, steps: int) -> dict:
  """The summary of a `jax.profiler.trace` directory, read with JAX's own ProfileData; a trace
  without device events (a CPU run) says so instead."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not paths:
    return {"gpu_events": False, "note": f"no GPU device events in the trace: no .xplane.pb "
            f"under {trace_dir}"}
  events, planes = device_events(jax.profiler.ProfileData.from_file(paths[-1]))
  if not events:
    return {"gpu_events": False, "planes": planes,
            "note": f"no GPU device events in the trace: its planes are {', '.join(planes)} "
                    "(host threads only, as on a CPU)"}
  return summarize_events(events, hlo_text, steps)
