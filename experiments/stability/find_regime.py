"""How the study's unstable regime was found: `python experiments/stability/find_regime.py`.

Runs the baseline (no SLW) of configs/tiny.py for `--steps` steps at each (batch size, learning
rate, width) of a small grid and prints, per point, the steps whose loss ratio exceeds 1.2, the
max ratio and the final training loss. The study takes the smallest batch and learning rate
whose baseline is visibly unstable (several steps above 1.2), so the comparison is not driven
by sampling noise of tiny batches (512-token SLW steps have noisy losses: see NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from slw_jax import config_lib, report  # noqa: E402


def probe(batch: int, lr: float, width: int, steps: int, seqlen: int, workdir: str,
          warmup: int = 10, slw_start: int = 0, slw_steps: int = 30) -> dict:
  """One baseline run (or, with `slw_start`, SLW linear from that length over `slw_steps`)."""
  from slw_jax import trainer  # pylint: disable=g-import-not-at-top
  pacing = ({"pacing.kind": "linear", "pacing.seqlen_start": slw_start, "pacing.multiple": 8,
             "pacing.duration_steps": slw_steps} if slw_start else {"pacing.kind": "none"})
  overrides = {"batch_size": batch, "train_tokens": None, "train_steps": steps, **pacing,
               "model.max_seqlen": seqlen, "model.d_model": width,
               "optim.lr": lr, "optim.min_lr": lr / 10, "optim.warmup_steps": warmup,
               "optim.b2": 0.999, "eval.every_steps": 10**6, "checkpoint.every_steps": 10**6,
               "log.print_every_steps": 10**6, "monitor.max_bad_in_a_row": 10**6}
  c = config_lib.validate(config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py"),
                                                      overrides))
  started = time.time()
  trainer.Trainer(c, workdir).run()
  run = report.read_run(workdir)
  ratios = [r["loss_ratio"] for r in run.steps]
  return {"batch": batch, "tokens_per_step": batch * seqlen, "lr": lr, "width": width,
          "pacing": f"SLW from {slw_start} over {slw_steps}" if slw_start else "none",
          "max_loss": max(r["loss"] for r in run.steps),
          "above_1.2": sum(r > 1.2 for r in ratios), "max_ratio": max(ratios),
          "final_loss": run.steps[-1]["loss"], "seconds": time.time() - started}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="example: "
                                   "python experiments/stability/find_regime.py --lrs=0.03,0.1 "
                                   "--steps=30")
  parser.add_argument("--batches", default="64")
  parser.add_argument("--lrs", default="0.01,0.03,0.1")
  parser.add_argument("--widths", default="128")
  parser.add_argument("--seqlen", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--warmup", type=int, default=10, help="LR warmup steps.")
  parser.add_argument("--slw_starts", default="0", help="0: baseline; else SLW from each.")
  parser.add_argument("--slw_steps", type=int, default=30, help="SLW's T.")
  args = parser.parse_args()
  print("| batch | tokens/step | lr | width | pacing | steps > 1.2 | max ratio | max loss | "
        "final loss | s |")
  print("| --- " * 10 + "|")
  grid = itertools.product([int(b) for b in args.batches.split(",")],
                           [float(x) for x in args.lrs.split(",")],
                           [int(w) for w in args.widths.split(",")],
                           [int(s) for s in args.slw_starts.split(",")])
  for batch, lr, width, start in grid:
    with tempfile.TemporaryDirectory() as workdir:
      r = probe(batch, lr, width, args.steps, args.seqlen, workdir, args.warmup, start,
                args.slw_steps)
    print(f"| {r['batch']} | {r['tokens_per_step']} | {r['lr']:g} | {r['width']} | "
          f"{r['pacing']} | {r['above_1.2']} | {r['max_ratio']:.3f} | {r['max_loss']:.2f} | "
          f"{r['final_loss']:.3f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
