"""Peak FLOP/s for MFU, JAX's persistent compilation cache, and the accelerator check."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp

from slw_jax import errors

# Dense peak FLOP/s per chip from vendor datasheets: (bfloat16, float32 as the step runs it).
# float32 matmuls on NVIDIA GPUs run as TF32 under JAX's default precision. Names are matched
# as whole words of `device_kind`, the more specific first (an "H100 PCIe" is not an SXM H100,
# an "L40S" is not an "L4").
KNOWN_PEAKS = {
    "H100 PCIe": (756e12, 378e12), "GH200": (989e12, 495e12), "H200": (989e12, 495e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12), "V100": (125e12, 15.7e12), "L40S": (362e12, 183e12),
    "L4": (121e12, 60e12), "TPU v4": (275e12, 275e12), "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12), "TPU v5p": (459e12, 459e12), "TPU v5": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
}


def datasheet_peak(device_kind: str) -> tuple[float, float] | None:
  """(bf16, fp32) dense peak of a device kind from KNOWN_PEAKS, or None when unknown."""
  for name, peaks in KNOWN_PEAKS.items():
    if re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", device_kind, re.IGNORECASE):
      return peaks
  return None


def measured_matmul_flops(size: int = 1024, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 matmul rate of the default device (used for CPUs)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops(configured: float, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number came from)."""
  if configured > 0:
    return configured, "hardware.peak_flops"
  kind = jax.devices()[0].device_kind
  peaks = datasheet_peak(kind)
  if peaks is not None:
    return (peaks[0] if dtype == "bfloat16" else peaks[1]), f"datasheet ({kind})"
  return measured_matmul_flops(), f"measured float32 matmul ({kind})"


# The share of GPU memory JAX's allocator takes at start (main.py sets
# XLA_PYTHON_CLIENT_MEM_FRACTION to this unless it is set; JAX's own default is 0.75). The rest
# is left to CUDA, cuDNN and NCCL workspaces. `plan --memory` checks fit against it too.
GPU_MEMORY_FRACTION = 0.90


def use_gpu_memory_fraction():
  """Lets JAX take GPU_MEMORY_FRACTION of each GPU (before the backend starts)."""
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{GPU_MEMORY_FRACTION:.2f}")


def device_memory_limit() -> int | None:
  """Bytes of memory of the first local device, when the platform reports it (not on CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def enable_compilation_cache(cache_dir: str):
  """Turns on JAX's persistent compilation cache ("" leaves it off)."""
  if not cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Modules the accelerator wheels install (requirements-cuda.txt, requirements-tpu.txt).
ACCELERATOR_MODULES = {"jax_cuda13_plugin": "CUDA", "jax_cuda12_plugin": "CUDA", "libtpu": "TPU"}


class NoAcceleratorError(errors.InputError):
  """Accelerator wheels are installed but JAX found no accelerator (drivers, visibility)."""


# Device files an accelerator machine has whatever is installed: NVIDIA's driver, a TPU VM.
ACCELERATOR_DEVICE_FILES = {"/dev/nvidia[0-9]*": "CUDA", "/dev/accel[0-9]*": "TPU"}
INSTALL_HINT = {"CUDA": "make setup ACCEL=cuda", "TPU": "make setup ACCEL=tpu"}


def installed_accelerators() -> list[str]:
  """The accelerator kinds whose JAX plugin wheels are importable here (nothing is imported)."""
  found = {kind for module, kind in ACCELERATOR_MODULES.items()
           if importlib.util.find_spec(module) is not None}
  return sorted(found)


def present_accelerators() -> list[str]:
  """The accelerator kinds whose device files this machine has."""
  return sorted({kind for pattern, kind in ACCELERATOR_DEVICE_FILES.items()
                 if glob.glob(pattern)})


def check_accelerator(allow_cpu: bool):
  """Stops a run that would silently train on the CPU of an accelerator machine: JAX's backend
  is the CPU although accelerator wheels are installed. `hardware.allow_cpu=true`, or
  JAX_PLATFORMS=cpu set on purpose, lets it train on the CPU."""
  if allow_cpu or jax.default_backend() != "cpu":
    return
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return
  wheels = installed_accelerators()
  if wheels:
    raise NoAcceleratorError(
        f"JAX found no {'/'.join(wheels)} device although its wheels are installed (driver or "
        "device visibility problem: check nvidia-smi / CUDA_VISIBLE_DEVICES, or the TPU runtime); "
        "set config.hardware.allow_cpu=true to train on the CPU anyway")
  devices = present_accelerators()
  if devices:
    raise NoAcceleratorError(
        f"this machine has a {'/'.join(devices)} device but JAX has only its CPU wheels: run "
        f"{' or '.join(INSTALL_HINT[d] for d in devices)}, or set config.hardware.allow_cpu=true "
        "to train on the CPU anyway")
