"""Peak FLOP/s for MFU, and JAX's persistent compilation cache."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip from vendor datasheets: (bfloat16, float32 as the step runs it).
# float32 matmuls on NVIDIA GPUs run as TF32 under JAX's default precision.
KNOWN_PEAKS = {
    "H200": (989e12, 495e12), "H100": (989e12, 495e12), "A100": (312e12, 156e12),
    "V100": (125e12, 15.7e12), "L4": (121e12, 60e12), "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12), "TPU v5e": (197e12, 197e12), "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
}


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
  for name, (bf16, fp32) in KNOWN_PEAKS.items():
    if name.lower() in kind.lower():
      return (bf16 if dtype == "bfloat16" else fp32), f"datasheet ({kind})"
  return measured_matmul_flops(), f"measured float32 matmul ({kind})"


def device_memory_limit() -> int | None:
  """Bytes of memory of the first local device, when the platform reports it (not on CPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def enable_compilation_cache(cache_dir: str):
  """Turns on JAX's persistent compilation cache ("" leaves it off)."""
  if not cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
