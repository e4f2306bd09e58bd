"""Step time of the sharded train step on 1 vs 8 simulated CPU devices (the sharded path's
overhead: 8 simulated devices share this machine's cores, so no speed-up is expected).

Usage: .venv/bin/python benchmarks/sharding_overhead.py [--steps=3] [--seqlen=256]
Sets --xla_force_host_platform_device_count=8 itself (before JAX starts).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from slw_jax import config_lib, train_step  # noqa: E402

CONFIGS = {
    "tiny": {},
    "20m": {"model.n_layer": 6, "model.d_model": 512, "model.n_head": 8},
}
MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2)]


def step_seconds(c, mesh, seqlen, steps):
  c = config_lib.validate(config_lib.load_config_file(
      "configs/tiny.py", {**c, "mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2],
                          # As measured in RESULTS.md: the 259-row vocabulary stays whole.
                          "mesh.allow_replicated": True}))
  placed = train_step.on_mesh(c, jax.devices()[:int(np.prod(mesh))])
  layout = placed.layout
  device = train_step.sharded_steps(c, placed, skip_bad=False, background=False)
  state, shape = device.init(), (c.batch_size, seqlen)
  executable = device.executables.get(shape)
  tokens = np.random.default_rng(0).integers(0, 259, (c.batch_size, seqlen + 1)).astype(np.int32)
  batch = layout.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, c.batch_size)
  times = []
  for _ in range(steps + 1):  # The first call warms up.
    start = time.perf_counter()
    state, metrics = executable(state, batch, np.float32(1e-4))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return statistics.median(times[1:]), device.executables.stats[shape].compile_s, placed.num_params


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--seqlen", type=int, default=256)
  args = parser.parse_args()
  print(f"batch 16 x seqlen {args.seqlen}, {len(jax.devices())} simulated CPU devices on "
        f"{os.cpu_count()} cores")
  print("| config | params | mesh (data, fsdp, tensor) | compile s | step ms | vs 1 device |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, overrides in CONFIGS.items():
    baseline = None
    for mesh in MESHES:
      seconds, compile_s, n_params = step_seconds(overrides, mesh, args.seqlen, args.steps)
      baseline = baseline or seconds
      print(f"| {name} | {n_params / 1e6:.1f}M | {mesh} | {compile_s:.1f} | {seconds * 1e3:.0f} "
            f"| {seconds / baseline:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
