"""benchmarks/accelerator_check.py --smoke runs end to end on the CPU: every item, exit 0."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "accelerator_check.py"


def smoke_env() -> dict:
  """This environment on the CPU with one device: conftest's forced 8 devices are removed (the
  check lays everything on one device, as on one GPU)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


@pytest.mark.slow
def test_smoke_run_measures_every_item(tmp_path):
  result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", f"--out={tmp_path}"],
                          cwd=REPO, env=smoke_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(tmp_path / "accelerator_check.json") as f:
    report = json.load(f)
  for key in ("environment", "matmul", "steps_by_seqlen", "tiny_run", "failed", "ok"):
    assert key in report, key
  assert report["ok"] and report["failed"] == [] and report["imported_forbidden"] == []

  env = report["environment"]
  assert env["backend"] == "cpu" and env["device_count"] == 1
  assert env["datasheet_bf16_peak"] is None  # A CPU has no datasheet row: MFU against it is null.
  assert report["matmul"]["flops_per_s"] > 0

  rows = report["steps_by_seqlen"]
  # Both steps at every length: the llm.c-comparable check (no dropout) and the paper recipe.
  assert [(r["step"], r["seqlen"]) for r in rows] == [
      ("check", 32), ("check", 64), ("recipe", 32), ("recipe", 64)]
  for row in rows:
    assert "error" not in row, row
    assert row["loss_finite"] and math.isfinite(row["loss_last"])
    assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["compile_s"] > 0
    assert row["cudnn_in_hlo"] is False and row["attention"] == "blockwise"
    assert row["microbatches"] == 1  # "auto" on a device that reports no memory limit.
    assert row["mfu_datasheet"] is None and row["mfu_measured_matmul"] > 0
  assert {(r["dropout"], r["attention_dropout"]) for r in rows if r["step"] == "check"} == {
      (0.0, 0.0)}
  assert {(r["dropout"], r["attention_dropout"]) for r in rows if r["step"] == "recipe"} == {
      (0.1, 0.1)}

  run = report["tiny_run"]
  assert run["completed"] and run["steps"] == 20 and run["loss_finite"]
  assert run["loss_fell"] and run["last10_mean"] < run["first10_mean"]

  table = (tmp_path / "accelerator_check.md").read_text()
  assert table.startswith("| step | seqlen |") and "tiny SLW run: 20 steps" in table
  assert "| check | 32 |" in table and "| recipe | 64 |" in table
