"""transformers' PyTorch GPT-2 training step (AdamW, clipping) on given shapes: tokens/s.

Runs in a benchmark-only environment (torch + transformers, never in requirements.txt):
  python3 -m venv .venv-bench && .venv-bench/bin/pip install torch transformers numpy
Called by benchmarks/vs_torch.py; prints one JSON line per shape.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n_layer", type=int, required=True)
  parser.add_argument("--d_model", type=int, required=True)
  parser.add_argument("--n_head", type=int, required=True)
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--max_seqlen", type=int, required=True)
  parser.add_argument("--batch_size", type=int, required=True)
  parser.add_argument("--seqlens", required=True)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.max_seqlen,
                      n_embd=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = GPT2LMHeadModel(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
  for seqlen in map(int, args.seqlens.split(",")):
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, seqlen + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
      logits = model(input_ids=inputs).logits
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      return loss.item()

    step()
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    print(json.dumps({"seqlen": seqlen, "step_s": step_s,
                      "tokens_per_s": args.batch_size * seqlen / step_s,
                      "torch": torch.__version__, "attn": model.config._attn_implementation}),
          flush=True)


if __name__ == "__main__":
  main()
