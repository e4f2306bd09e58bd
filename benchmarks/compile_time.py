"""Compile seconds of the largest bucket, scanned against unrolled layers (issue 12).

Each case runs in its own process (the simulated device count is fixed when JAX starts): the
train step laid out on N simulated CPU devices exactly as the trainer lays it out, the largest
bucket AOT-compiled with the trainer's compiler options (not `plan --memory`'s estimate-only
ones), nothing allocated. Microbatches are fixed so that each case is one compile.

    .venv/bin/python benchmarks/compile_time.py [--config=configs/gpt2_1p5b.py] [--devices=16]
        [--microbatches=1] [--layers=12,48] [--scan=true,false] [--mesh=data=2,fsdp=8]

The defaults are the docs' two-node `gpt2_1p5b` command (16 GPUs, data=2 x fsdp=8) with the
microbatch count `auto` picks there when scanned (benchmarks/RESULTS.md).
"""

import argparse
import json
import subprocess
import sys


def child(config_path: str, devices: int, overrides: dict):
  from slw_jax import config_lib, pacing, plan  # pylint: disable=g-import-not-at-top
  config = config_lib.validate(config_lib.load_config_file(config_path, overrides))
  _, steps, _ = plan.simulated_steps(config, plan.use_cpu_devices(devices), 80.0)
  shape = pacing.largest_bucket(pacing.run_schedule(config).buckets())
  _, stats = steps.compile_with(shape, steps.microbatches(*shape))
  print(json.dumps({"compile_s": stats.compile_s, "gib": stats.memory_bytes / 2**30}))


def compile_case(args, layers: int, scan: str) -> dict:
  overrides = {"optim.microbatches": args.microbatches, "model.n_layer": layers,
               "model.scan_layers": scan == "true"}
  overrides.update({f"mesh.{k}": int(v) for k, v in
                    (item.split("=") for item in args.mesh.split(",") if item)})
  command = [sys.executable, __file__, "--child", json.dumps(overrides),
             f"--config={args.config}", f"--devices={args.devices}"]
  out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/gpt2_1p5b.py")
  parser.add_argument("--devices", type=int, default=16)
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--layers", default="12,48")
  parser.add_argument("--scan", default="true,false")
  parser.add_argument("--mesh", default="data=2,fsdp=8")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    return child(args.config, args.devices, json.loads(args.child))
  print("| n_layer | scan_layers | compile s | GiB/device (trainer's compile) |\n"
        "| --- | --- | --- | --- |")
  for layers in map(int, args.layers.split(",")):
    for scan in args.scan.split(","):
      report = compile_case(args, layers, scan)
      print(f"| {layers} | {scan} | {report['compile_s']:.1f} | {report['gib']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
