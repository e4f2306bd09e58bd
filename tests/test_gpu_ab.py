"""benchmarks/gpu_ab.py: the CPU smoke of the whole matrix, bad input, its HLO and profile
readers (gpu_ab_hlo.py) on GPU-shaped text (a CPU compiles no cuBLAS calls and traces no device
kernels) and its tables (gpu_ab_tables.py) on hand-made records."""

import gzip
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import REPO
# The CPU with one device, conftest's forced 8 removed: the script, as the check, lays
# everything on one device, as on one GPU.
from test_accelerator_check import smoke_env

sys.path.insert(0, str(REPO / "benchmarks"))
# pylint: disable=wrong-import-position
import gpu_ab  # noqa: E402
import gpu_ab_hlo  # noqa: E402
import gpu_ab_tables  # noqa: E402

SCRIPT = REPO / "benchmarks" / "gpu_ab.py"
GIB = 2**30


# ----- the smoke run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_ab")
  done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", f"--out={out}"], cwd=REPO,
                        env=smoke_env(), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  with open(out / "gpu_ab.json") as f:
    return out, json.load(f)


@pytest.mark.slow
def test_smoke_records_every_variant_in_both_passes(smoke):
  _, report = smoke
  assert set(report["passes"]) == {"h100", "native"}
  h100 = report["passes"]["h100"]["variants"]
  assert set(h100) == set(gpu_ab.VARIANTS) - {"Rc"}  # Rc: cuDNN dropout, not on a CPU.
  assert report["not_available"]["Rc"].startswith("not available on cpu")
  for name, row in h100.items():
    assert row["status"] in ("ok", "compiled"), (name, row)
    assert row["memory"]["bytes"] > 0 and row["compile_s"] > 0 and row["gemms"], name
    if name != "V0c":
      assert row["loss_finite"] and row["step_ms"] > 0 and row["tokens_per_s"] > 0, name
  assert set(report["passes"]["native"]["variants"]) == {"V0", "V7"}
  assert report["passes"]["h100"]["cudnn_dropout_probe"]["available"] is False  # A CPU.
  assert "does not apply on cpu" in report["cap_note"]
  assert report["parent_started_jax"] is False  # It would hold GPU memory during the passes.


@pytest.mark.slow
def test_smoke_variants_compile_what_they_say(smoke):
  _, report = smoke
  h100 = report["passes"]["h100"]["variants"]
  assert h100["V0c"]["status"] == "compiled" and "step_ms" not in h100["V0c"]
  assert h100["V0"]["need"]["bytes"] > 0  # The compile-only need with the remat pass off.
  assert "rematerialization" in h100["V0"]["need"]["compiler_options"]["xla_disable_hlo_passes"]
  assert h100["V1"]["microbatches"] == 2
  assert "[the count V0 chose]" in h100["V2"]["microbatch_line"]
  assert h100["V0"]["xla_remat"] and not h100["V7"]["xla_remat"]
  assert h100["V8"]["compiler_options"]["xla_gpu_enable_triton_gemm"] is False
  assert h100["R"]["attention"] == "blockwise"  # Attention dropout 0.1 on a CPU.
  # The fused head and the full head differ in their gemms (the f32 head backward is gone).
  assert h100["V0"]["gemms"] != h100["V4"]["gemms"]


@pytest.mark.slow
def test_smoke_profile_says_there_were_no_gpu_events(smoke):
  _, report = smoke
  for name in ("V0", "V7"):
    profile = report["passes"]["h100"]["variants"][name]["profile"]
    assert profile["gpu_events"] is False
    assert profile["note"].startswith("no GPU device events in the trace")


@pytest.mark.slow
def test_smoke_runs_the_torch_peer_and_writes_the_tables(smoke):
  out, report = smoke
  for name in ("T", "T_R"):
    row = report["torch"][name]
    assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["loss_finite"], row
  table = (out / "gpu_ab.md").read_text()
  for text in ("## Pass h100", "## Pass native", "| V0 | the H100 check", "| V0c |",
               "compile only", "## Gemm operand dtypes", "no GPU device events in the trace",
               "## PyTorch peer", "torch ratio: V7 (h100 pass) / T", "| Rc |",
               "cuDNN dropout probe (Rc's kernel): not available"):
    assert text in table, text
  with gzip.open(out / "hlo_V0.txt.gz", "rt") as f:
    assert "HloModule" in f.read(200)


# ----- bad input: one line, exit 2, nothing compiled ----------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--variants=V0,V9"], "V9"),
    (["--smoke", "--budget_s=1"], "--budget_s=1"),
    (["--smoke", "--rows=3", "--variants=V1"], "--rows=3"),  # 2 microbatches of 3 rows.
    (["--smoke", "--seqlen=36"], "--seqlen=36"),  # Not a multiple of pacing.multiple=8.
    (["--smoke", "--seqlen=2048"], "--seqlen=2048"),  # Past model.max_seqlen=1024.
    (["--smoke", "--variants=Rc"], "--variants=Rc"),  # cuDNN dropout asked for on a CPU.
])
def test_bad_input_is_one_line_and_exit_2_before_compiling(tmp_path, capsys, flags, named):
  assert gpu_ab.main(flags + [f"--out={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
  assert not (tmp_path / "gpu_ab.json").exists()  # It stopped before any pass started.


@pytest.mark.slow
def test_bad_input_exits_2_from_the_command_line(tmp_path):
  done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants=V0,nope",
                         f"--out={tmp_path}"], cwd=REPO, env=smoke_env(), capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 2 and done.stderr.strip().startswith("error: --variants=nope")


def test_the_h100_cap_needs_more_memory_than_the_h100_limit():
  h200 = {"backend": "gpu", "usable_bytes": 139.8 * GIB}
  fraction, _ = gpu_ab.h100_fraction(h200)
  assert fraction == pytest.approx(71.26 / 139.8)
  h100, why = gpu_ab.h100_fraction({"backend": "gpu", "usable_bytes": 79.18 * GIB})
  assert h100 is None and "skipped" in why
  cpu, why = gpu_ab.h100_fraction({"backend": "cpu", "usable_bytes": None})
  assert cpu is None and "does not apply on cpu" in why


# ----- HLO and profile readers on GPU-shaped input ------------------------------------------------

GPU_HLO = r"""HloModule jit_step_fn, entry_computation_layout={(bf16[8,16]{1,0})->f32[8,32]{1,0}}

%fused_computation (param_0: bf16[8,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  ROOT %multiply.1 = bf16[8,16]{1,0} multiply(bf16[8,16]{1,0} %param_0, bf16[8,16]{1,0} %param_0), metadata={op_type="mul" op_name="jit(step_fn)/jvp(GPT)/mul" source_file="/w/slw_jax/models.py" source_line=321}
}

%triton_gemm_dot.1 (p0: bf16[8,16], p1: bf16[16,32]) -> bf16[8,32] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,32]{1,0} parameter(1)
  ROOT %dot.2 = bf16[8,32]{1,0} dot(bf16[8,16]{1,0} %p0, bf16[16,32]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.10 (Arg_0.1: bf16[8,16], Arg_1.2: f32[16,32]) -> f32[8,32] {
  %Arg_0.1 = bf16[8,16]{1,0} parameter(0)
  %Arg_1.2 = f32[16,32]{1,0} parameter(1)
  %loop_multiply_fusion = bf16[8,16]{1,0} fusion(bf16[8,16]{1,0} %Arg_0.1), kind=kLoop, calls=%fused_computation
  %convert.3 = f32[8,16]{1,0} convert(bf16[8,16]{1,0} %loop_multiply_fusion)
  %custom-call.4 = (f32[8,32]{1,0}, s8[4194304]{0}) custom-call(f32[8,16]{1,0} %convert.3, f32[16,32]{1,0} %Arg_1.2), custom_call_target="__cublas$lt$matmul", metadata={op_type="dot_general" op_name="jit(step_fn)/transpose(jvp(GPT))/head/dot_general" source_file="/w/slw_jax/train_step.py" source_line=500}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %convert.5 = bf16[16,32]{1,0} convert(f32[16,32]{1,0} %Arg_1.2)
  %custom-call.6 = (f32[8,32]{1,0}, s8[1024]{0}) custom-call(bf16[8,16]{1,0} %Arg_0.1, bf16[16,32]{1,0} %convert.5), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %gemm_fusion_dot.2 = bf16[8,32]{1,0} fusion(bf16[8,16]{1,0} %Arg_0.1, bf16[16,32]{1,0} %convert.5), kind=kCustom, calls=%triton_gemm_dot.1, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.7 = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(bf16[2,8,4,16]{3,2,1,0} %q, bf16[2,8,4,16]{3,2,1,0} %k, bf16[2,8,4,16]{3,2,1,0} %v), custom_call_target="__cudnn$fmhaSoftmax"
  %custom-call.8 = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(bf16[2,8,4,16]{3,2,1,0} %q, bf16[2,8,4,16]{3,2,1,0} %k), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %copy.3.remat = f32[8,16]{0,1} copy(f32[8,16]{1,0} %convert.3)
  ROOT %get-tuple-element.6 = f32[8,32]{1,0} get-tuple-element((f32[8,32]{1,0}, s8[4194304]{0}) %custom-call.4), index=0
}
"""


def test_gemm_table_counts_cublas_and_triton_gemms_by_operand_dtype():
  rows = {(r["kind"], r["lhs"], r["rhs"], r["out"]): r
          for r in gpu_ab_hlo.gemm_table(gpu_ab_hlo.parse_hlo(GPU_HLO))}
  assert set(rows) == {("cublasLt", "f32", "f32", "f32"), ("cublas", "bf16", "bf16", "f32"),
                       ("triton gemm", "bf16", "bf16", "bf16")}
  # 2 * [8, 32] outputs * 16 contracted: the cuBLAS output is the tuple's first element.
  assert rows[("cublasLt", "f32", "f32", "f32")]["gflop_static"] == pytest.approx(2 * 8 * 32 * 16
                                                                                   / 1e9)
  assert all(r["count"] == 1 for r in rows.values())


def test_hlo_facts_count_cudnn_calls_and_remat_clones():
  facts = gpu_ab_hlo.hlo_facts(GPU_HLO)
  assert facts["cudnn_fmha"] == {"__cudnn$fmhaSoftmax": 1, "__cudnn$fmhaSoftmaxBackward": 1}
  assert facts["cudnn_fmha_calls"] == 2
  assert facts["remat_clones"] == 1 and facts["remat_clone_names"] == ["copy.3.remat"]


def test_source_of_reads_metadata_or_the_fused_computation():
  index = gpu_ab_hlo.parse_hlo(GPU_HLO)
  assert gpu_ab_hlo.source_of("custom-call.4", index).startswith("train_step.py:500")
  # The fusion has no metadata of its own: the line of the instruction it fuses.
  assert gpu_ab_hlo.source_of("loop_multiply_fusion", index).startswith("models.py:321")
  assert gpu_ab_hlo.source_of("no_such_op", index) == "-"


def test_categories_follow_the_instruction_then_the_kernel_name():
  index = gpu_ab_hlo.parse_hlo(GPU_HLO)
  expect = {"custom-call.4": "gemm", "gemm_fusion_dot.2": "gemm",
            "loop_multiply_fusion": "elementwise/loop fusion", "custom-call.7": "cuDNN attention",
            "copy.3.remat": "copies/transposes"}
  for name, category in expect.items():
    assert gpu_ab_hlo.category(index[name], name) == category, name
  assert gpu_ab_hlo.category(None, "nvjet_hsh_256x128_2cta") == "gemm"
  assert gpu_ab_hlo.category(None, "input_reduce_fusion_7") == "reduction/input fusion"
  assert gpu_ab_hlo.category(None, "ncclDevKernel_AllReduce") == "collectives"


XSPACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000000
             stats { metadata_id: 10 str_value: "custom-call.4" } }
    events { metadata_id: 2 offset_ps: 5000000000 duration_ps: 1000000000
             stats { metadata_id: 10 ref_value: 20 } }
    events { metadata_id: 3 offset_ps: 7000000000 duration_ps: 3000000000
             stats { metadata_id: 10 str_value: "command_buffer.1" } }
    events { metadata_id: 1 offset_ps: 9000000000 duration_ps: 4000000000
             stats { metadata_id: 10 str_value: "custom-call.4" } }
    events { metadata_id: 4 offset_ps: 14000000000 duration_ps: 2000000000
             stats { metadata_id: 10 str_value: "command_buffer.1" } }
  }
  lines { id: 2 name: "XLA Ops"
    events { metadata_id: 2 offset_ps: 0 duration_ps: 90000000000 } }
  lines { id: 3 name: "Aggregated"
    events { metadata_id: 2 offset_ps: 0 duration_ps: 90000000000 } }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_f32f32_tf32" } }
  event_metadata { key: 2 value { id: 2 name: "loop_multiply_fusion" } }
  event_metadata { key: 3 value { id: 3 name: "nvjet_hsh_256x128_2cta" } }
  event_metadata { key: 4 value { id: 4 name: "gemm_fusion_dot_2" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
  stat_metadata { key: 20 value { id: 20 name: "loop_multiply_fusion" } }
}
planes { id: 2 name: "/host:CPU" }
"""


def write_trace(tmp_path, text: str):
  """A trace directory as jax.profiler.trace leaves it, holding the XSpace `text`."""
  folder = tmp_path / "plugins" / "profile" / "run"
  folder.mkdir(parents=True)
  serialized = jax.profiler.ProfileData.text_proto_to_serialized_xspace(text)
  (folder / "host.xplane.pb").write_bytes(serialized)
  return str(tmp_path)


def test_profile_summary_of_gpu_events_by_category_top_ops_and_source(tmp_path):
  summary = gpu_ab_hlo.summarize_profile(write_trace(tmp_path, XSPACE), GPU_HLO, steps=2)
  # Kernels of the stream lines only: not the derived "XLA Ops" view nor another aggregate.
  assert summary["gpu_events"] and summary["events"] == 5
  assert summary["device_ms_per_step"] == pytest.approx(7.0)  # (4 + 1 + 3 + 4 + 2) ms / 2.
  assert summary["categories"] == pytest.approx({"gemm": 6.5, "elementwise/loop fusion": 0.5})
  top = summary["top"][0]
  assert top["op"] == "custom-call.4" and top["ms_per_step"] == pytest.approx(4.0)
  assert top["calls_per_step"] == 1 and top["source"].startswith("train_step.py:500")
  # Inside a command buffer hlo_op names the buffer: XLA's kernel name ("." -> "_") maps the
  # triton gemm; cuBLAS's kernel maps to nothing and its name decides its category.
  assert {o["op"] for o in summary["top"]} == {"custom-call.4", "loop_multiply_fusion",
                                               "nvjet_hsh_256x128_2cta", "gemm_fusion_dot.2"}
  assert summary["unmapped_ms_per_step"] == pytest.approx(1.5)


def test_profile_without_stream_lines_reads_the_others_but_not_derived_ones(tmp_path):
  text = XSPACE.replace('name: "Stream #13(compute)"', 'name: "Kernels"').replace(
      'name: "Aggregated"', 'name: "XLA Modules"')
  summary = gpu_ab_hlo.summarize_profile(write_trace(tmp_path, text), GPU_HLO, steps=2)
  assert summary["events"] == 5 and summary["device_ms_per_step"] == pytest.approx(7.0)


def test_profile_without_device_planes_says_so(tmp_path):
  summary = gpu_ab_hlo.summarize_profile(
      write_trace(tmp_path, 'planes { id: 2 name: "/host:CPU" }'), GPU_HLO, steps=3)
  assert summary["gpu_events"] is False
  assert summary["note"].startswith("no GPU device events in the trace") and "/host:CPU" in \
      summary["note"]
  empty = gpu_ab_hlo.summarize_profile(str(tmp_path / "nothing"), GPU_HLO, steps=3)
  assert empty["gpu_events"] is False and "no .xplane.pb" in empty["note"]


def test_captured_stderr_sees_xla_warnings_written_to_the_file_descriptor():
  sink = []
  with gpu_ab.captured_stderr(sink):
    os.write(2, b"W0000 hlo_rematerialization.cc:3005] Can't reduce memory use below "
                b"67.77GiB (72766896128 bytes) by rematerialization; only reduced to 69.00GiB\n")
  assert gpu_ab.REMAT_WARNING.findall(sink[0])
  warnings = {"xla_remat_warnings": gpu_ab.REMAT_WARNING.findall(sink[0])}
  assert gpu_ab_tables._warning(warnings) == "below 67.77GiB"  # pylint: disable=protected-access


def compiled_row(change: str, step_ms=None, **fields) -> dict:
  """A pass row as run_variant records it (GiB-sized memory, one gemm)."""
  row = {"change": change, "status": "ok" if step_ms else "compiled", "microbatches": 1,
         "compile_s": 5.0, "memory": {"bytes": 69 * GIB}, "cudnn_fmha_calls": 24,
         "remat_clones": 3, "xla_remat": True, "microbatch_line": "microbatches: 1 ...",
         "xla_remat_warnings": [], "gemms": []}
  if step_ms:
    row.update(step_ms=step_ms, step_min_ms=step_ms - 1, tokens_per_s=65536 / step_ms * 1e3,
               mfu_datasheet=0.25, mfu_measured_matmul=0.4, loss_finite=True)
  return {**row, **fields}


def test_pass_table_gives_deltas_against_v0_and_keeps_a_failed_runs_compile():
  record = {"variants": {
      "V0": compiled_row("base", 200.0, need={"bytes": 80 * GIB, "remat_clones": 0}),
      "V7": compiled_row("best", 150.0, xla_remat=False),
      "V6": compiled_row("no remat", status="error", step_ms=None,
                         error="XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory"),
      "V1": {"change": "2 mb", "status": "skipped", "error": "skipped: 300 s + 40 s"}}}
  lines = {line.split(" | ")[0]: line
           for line in gpu_ab_tables.pass_lines("h100", record, {}, gpu_ab.VARIANTS)}
  assert "| 150.0 / 149.0 | -50.0 | -25.0% |" in lines["| V7"]
  assert "| 69.00 | 80.00 |" in lines["| V0"]  # Memory as compiled, and the need without remat.
  assert "| 69.00 | 69.00 |" in lines["| V7"]  # Remat pass off: the compile is the need.
  assert "| 69.00 |" in lines["| V6"] and "error: XlaRuntimeError: RESOURCE_EXHAUSTED" in \
      lines["| V6"]
  assert "skipped: 300 s" in lines["| V1"] and "skipped: skipped" not in lines["| V1"]


def test_probe_line_says_what_each_number_should_be():
  line = gpu_ab_tables.probe_line({"available": True, "rate": 0.1, "kept_fraction": 0.9,
                                   "same_mask_next_call": 1.0,
                                   "same_mask_other_call_in_program": 0.82,
                                   "dv_relative_error_vs_forward_mask": 0.004,
                                   "between_devices": "not measurable with one device"})
  assert "kept fraction 0.900 (want 0.900)" in line and "independent masks: 0.820" in line
  assert "next call 1.000" in line and "1.000: the mask never changes" in line


def test_a_probe_that_aborts_is_a_row_not_a_lost_pass(tmp_path):
  """On jax 0.11.2 cuDNN's dropout probe aborted the process (an XLA check failure no `except`
  catches) and took the whole H100 pass with it: the probe runs in a child, its abort a row."""
  script = tmp_path / "aborts.py"
  script.write_text("import sys, os\nsys.stderr.write('F1204 x.cc:1] Check failed: boom\\n')\n"
                    "sys.stderr.flush()\nos.abort()\n")
  found = gpu_ab.cudnn_probe(str(script))
  assert found["available"] is False
  assert "status -6" in found["why"] and "Check failed: boom" in found["why"]


def test_a_probe_that_runs_returns_its_json_line(tmp_path):
  script = tmp_path / "prints.py"
  script.write_text("print('a log line')\nprint('{\"available\": true, \"kept\": 0.9}')\n")
  assert gpu_ab.cudnn_probe(str(script)) == {"available": True, "kept": 0.9}
