"""Our train step against transformers' PyTorch GPT-2 step on the same shapes, same run.

Usage: .venv/bin/python benchmarks/vs_torch.py [--set model.n_layer=4 ...] [--seqlens=256]
Needs .venv-bench (see benchmarks/torch_gpt2_step.py). Also reports our MFU against the float32
matmul rate measured in the same run.
"""

import argparse
import json
import subprocess

from slw_jax import hardware

import train_buckets  # pylint: disable=g-bad-import-order

SMALL = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.max_seqlen=256",
         "batch_size=16"]


def torch_rates(c, seqlens, steps):
  m = c.model
  command = [".venv-bench/bin/python", "benchmarks/torch_gpt2_step.py",
             f"--n_layer={m.n_layer}", f"--d_model={m.d_model}", f"--n_head={m.n_head}",
             f"--vocab_size={m.vocab_size}", f"--max_seqlen={m.max_seqlen}",
             f"--batch_size={c.batch_size}", f"--seqlens={seqlens}", f"--steps={steps}"]
  out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
  return {r["seqlen"]: r for r in map(json.loads, out.splitlines())}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--set", action="append", default=None)
  parser.add_argument("--seqlens", default="256")
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  args.config, args.json = "configs/tiny.py", ""
  args.set = args.set or SMALL
  c = train_buckets.load(args)
  shapes = [(c.batch_size, int(s)) for s in args.seqlens.split(",")]
  peak = hardware.measured_matmul_flops(2048)
  ours_first = train_buckets.measure(c, shapes, args.steps)[1]
  theirs = torch_rates(c, args.seqlens, args.steps)
  ours_again = train_buckets.measure(c, shapes, args.steps)[1]
  peak = max(peak, hardware.measured_matmul_flops(2048))
  print(f"shapes {' '.join(args.set)}; float32 matmul rate {peak / 1e9:.1f} GFLOP/s")
  print("| batch x seqlen | slw_jax tokens/s | MFU | torch+transformers tokens/s | ratio |")
  print("| --- | --- | --- | --- | --- |")
  for a, b in zip(ours_first, ours_again):
    ours = max(a, b, key=lambda r: r["tokens_per_s"])
    torch_row = theirs[ours["seqlen"]]
    print(f"| {ours['batch_size']} x {ours['seqlen']} | {ours['tokens_per_s']:,.0f} | "
          f"{ours['flops_per_s'] / peak:.1%} | {torch_row['tokens_per_s']:,.0f} "
          f"(torch {torch_row['torch']}, {torch_row['attn']}) | "
          f"{ours['tokens_per_s'] / torch_row['tokens_per_s']:.2f}x |")


if __name__ == "__main__":
  main()
