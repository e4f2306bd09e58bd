"""Wall-clock of `python -m slw_jax.plan` for the full-size configs (every step printed).

Usage: .venv/bin/python benchmarks/plan_speed.py
"""

import argparse
import subprocess
import sys
import time

CONFIGS = ["configs/gpt2_117m.py", "configs/gpt2_1p5b.py", "configs/gpt3_125m.py"]


def main():
  argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help, not a run.
  for config in CONFIGS:
    for fmt in ("text", "json"):
      start = time.perf_counter()
      out = subprocess.run([sys.executable, "-m", "slw_jax.plan", f"--config={config}",
                            f"--format={fmt}"], capture_output=True, text=True, check=True)
      seconds = time.perf_counter() - start
      print(f"{config:24s} {fmt:5s} {seconds:6.2f} s  {len(out.stdout) / 1e6:7.1f} MB output")


if __name__ == "__main__":
  main()
