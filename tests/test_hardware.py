"""Accelerator install and detection: Makefile targets, pinned wheels, the no-accelerator stop."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from slw_jax import hardware

PRINT_PLATFORMS = (f"PY={sys.executable} -c "
                   "'import os; print(\"JAX_PLATFORMS=\" + os.environ.get(\"JAX_PLATFORMS\", \"unset\"))'")


def _make(*args):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "MAKEFLAGS")}
  return subprocess.run(["make", "-s", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=60)


def test_make_train_never_forces_the_cpu_and_make_test_does():
  # -o: treat the install stamps as up to date, so only the target's own command runs.
  train = _make("-o", ".venv/.installed-cpu", "train", PRINT_PLATFORMS)
  assert train.returncode == 0 and train.stdout.strip() == "JAX_PLATFORMS=unset", train.stderr
  test = _make("-o", ".venv/.installed-test", "-o", ".venv/.installed-cpu", "test",
               PRINT_PLATFORMS)
  assert test.returncode == 0 and test.stdout.strip() == "JAX_PLATFORMS=cpu", test.stderr


UNIT_TIER = "not slow and not fault and not multiprocess"


@pytest.mark.slow
def test_make_test_fast_runs_the_unit_tier_on_the_cpu():
  """`make test-fast` is pytest over the unit tier (no slow, fault or multiprocess test) on the
  CPU backend, and that tier leaves every fault and multi-process test out."""
  fast = _make("-n", "-o", ".venv/.installed-test", "-o", ".venv/.installed-cpu", "test-fast")
  assert fast.returncode == 0 and f'-m "{UNIT_TIER}" tests' in fast.stdout, fast.stderr
  cpu = _make("-o", ".venv/.installed-test", "-o", ".venv/.installed-cpu", "test-fast",
              PRINT_PLATFORMS)
  assert cpu.returncode == 0 and cpu.stdout.strip() == "JAX_PLATFORMS=cpu", cpu.stderr
  collected = subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", UNIT_TIER, "tests"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  ids = [line for line in collected.stdout.splitlines() if "::" in line]
  assert collected.returncode == 0 and len(ids) > 300, collected.stdout[-2000:]
  assert not [i for i in ids if i.startswith("tests/faults/") or "test_multihost" in i]


def test_unknown_accel_is_a_one_line_error():
  result = _make("-n", "setup", "ACCEL=rocm")
  assert result.returncode != 0
  assert "ACCEL=rocm is invalid: must be one of cpu cuda tpu" in result.stderr


def _requirements(name):
  return [line.split("#")[0].strip() for line in (REPO / name).read_text().splitlines()
          if line.split("#")[0].strip()]


@pytest.mark.parametrize("name,plugins", [
    ("requirements-cuda.txt", ("jax-cuda12-plugin", "jax-cuda12-pjrt")),
    ("requirements-tpu.txt", ("libtpu",))])
def test_accelerator_requirements_pin_the_trainers_jax_without_tensorflow(name, plugins):
  lines = _requirements(name)
  assert lines[0] == "-r requirements-train.txt"
  train = dict(line.split("==") for line in _requirements("requirements-train.txt"))
  pins = dict(line.split("==") for line in lines[1:])
  assert all(re.fullmatch(r"[\w.]+", version) for version in pins.values())  # Exact pins.
  if "jax-cuda12-plugin" in plugins:
    assert pins["jax-cuda12-plugin"] == pins["jax-cuda12-pjrt"] == train["jax"]
  else:
    assert pins["libtpu"].startswith("0.0.42")  # What jax[tpu]==0.10.2 asks for.
  assert set(plugins) <= set(pins)
  assert not any("tensorflow" in p or "seqio" in p for p in list(pins) + list(train))


def test_no_accelerator_found_stops_unless_allowed(monkeypatch):
  monkeypatch.setattr(hardware, "installed_accelerators", lambda: ["CUDA"])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  with pytest.raises(hardware.NoAcceleratorError) as info:
    hardware.check_accelerator(allow_cpu=False)
  message = str(info.value)
  assert "JAX found no CUDA device" in message and "hardware.allow_cpu=true" in message
  assert "\n" not in message
  hardware.check_accelerator(allow_cpu=True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # Asked for on purpose (make test does).
  hardware.check_accelerator(allow_cpu=False)
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(hardware, "installed_accelerators", lambda: [])
  hardware.check_accelerator(allow_cpu=False)  # A CPU machine with CPU wheels trains.


@pytest.mark.slow
def test_main_reports_a_missing_accelerator_in_one_line(tmp_path):
  """Through the real entry point: a fake CUDA plugin module on the path, no GPU."""
  (tmp_path / "jax_cuda12_plugin").mkdir()
  (tmp_path / "jax_cuda12_plugin" / "__init__.py").write_text("")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: JAX found no CUDA device")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind,bf16", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("TPU v5p", 459e12), ("cpu", None),
    ("NVIDIA L40", None)])
def test_datasheet_peaks_match_whole_names(kind, bf16):
  peaks = hardware.datasheet_peak(kind)
  assert (peaks and peaks[0]) == bf16 if bf16 else peaks is None


def test_an_accelerator_machine_with_cpu_wheels_is_told_what_to_install(monkeypatch):
  monkeypatch.setattr(hardware, "installed_accelerators", lambda: [])
  monkeypatch.setattr(hardware, "present_accelerators", lambda: ["CUDA"])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  with pytest.raises(hardware.NoAcceleratorError, match=r"has a CUDA device but JAX has only its "
                     r"CPU wheels: run make setup ACCEL=cuda"):
    hardware.check_accelerator(allow_cpu=False)
  hardware.check_accelerator(allow_cpu=True)


def test_make_remembers_the_accelerator_and_refuses_two(tmp_path):
  (tmp_path / ".accel").write_text("cuda\n")
  dry = _make("-n", "setup", f"VENV={tmp_path}")
  assert dry.returncode == 0 and "-r requirements-cuda.txt" in dry.stdout, dry.stderr
  assert "-r requirements.txt" not in dry.stdout  # No TensorFlow over the CUDA wheels.
  both = _make("-n", "setup", "ACCEL=cpu cuda")
  assert both.returncode != 0 and "ACCEL=cpu cuda is invalid" in both.stderr


def test_jax_gets_ninety_percent_of_gpu_memory_unless_told(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  hardware.use_gpu_memory_fraction()
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  hardware.use_gpu_memory_fraction()
  assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"
