"""Staging speed: prepared data from a local S3 server to local disk (issue 26; target: a 1 GB
dataset at least 100 MB/s on this 2-core machine).

A moto S3 server runs in its own process on 127.0.0.1 (as a real endpoint would be another
machine: it does not share this process's GIL). A prepared-data directory of `--megabytes`
(1024) of tokens (train.bin, validation.bin and metadata.json with their sha256, as `prepare`
writes them) is uploaded once; then `slw_jax.staging.stage` copies it to an empty cache
`--repeats` times (each from scratch, the sha256 checked on the way), and once more with the
cache warm (nothing fetched). Reported: MB/s of each cold staging, their median, and a local
disk copy of the same files for scale.

    .venv/bin/python benchmarks/stage_speed.py [--megabytes=1024] [--repeats=3]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import local_s3  # noqa: E402  pylint: disable=g-import-not-at-top


def _write_prepared(folder: str, megabytes: int):
  """Random uint16 tokens (incompressible, like real ids) in the layout prepare writes."""
  splits = {}
  for split, share in (("train", 0.99), ("validation", 0.01)):
    digest, size = hashlib.sha256(), int(megabytes * 2**20 * share) // 2 * 2
    with open(os.path.join(folder, f"{split}.bin"), "wb") as f:
      for start in range(0, size, 64 * 2**20):
        chunk = os.urandom(min(64 * 2**20, size - start))
        digest.update(chunk)
        f.write(chunk)
    splits[split] = {"file": f"{split}.bin", "tokens": size // 2, "documents": 1,
                     "sha256": digest.hexdigest()}
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json.dump({"splits": splits, "dtype": "uint16", "vocab_size": 50257}, f)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--megabytes", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--parallel", type=int, default=None, help="staging.PARALLEL override")
  parser.add_argument("--chunk_mb", type=int, default=None, help="staging.CHUNK override (MB)")
  args = parser.parse_args()
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from slw_jax import staging  # pylint: disable=g-import-not-at-top
  staging.PARALLEL = args.parallel or staging.PARALLEL
  staging.CHUNK = args.chunk_mb * 2**20 if args.chunk_mb else staging.CHUNK
  print(f"{staging.PARALLEL} range requests of {staging.CHUNK // 2**20} MB in flight")
  with local_s3.server():
    with tempfile.TemporaryDirectory() as scratch:
      source = os.path.join(scratch, "prepared")
      os.makedirs(source)
      _write_prepared(source, args.megabytes)
      total = sum(os.path.getsize(os.path.join(source, n)) for n in os.listdir(source))
      fs = staging.filesystem("s3://bench-bucket")
      fs.mkdir("s3://bench-bucket")
      started = time.perf_counter()
      fs.put(source + "/", "s3://bench-bucket/data/", recursive=True)
      print(f"uploaded {total / 2**20:,.0f} MB in {time.perf_counter() - started:.1f} s")
      d = config_dict.ConfigDict({"dir": "s3://bench-bucket/data",
                                  "cache_dir": os.path.join(scratch, "cache")})
      rates = []
      for repeat in range(args.repeats):
        shutil.rmtree(d.cache_dir, ignore_errors=True)
        started = time.perf_counter()
        staging.stage(d, log=lambda *_: None)
        rates.append(total / 2**20 / (time.perf_counter() - started))
        print(f"staging {repeat + 1}: {rates[-1]:.0f} MB/s")
      started = time.perf_counter()
      staging.stage(d, log=lambda *_: None)
      print(f"staging with the cache warm: {time.perf_counter() - started:.2f} s (nothing "
            "fetched)")
      started = time.perf_counter()
      shutil.copytree(source, os.path.join(scratch, "local_copy"))
      print(f"local disk copy: {total / 2**20 / (time.perf_counter() - started):.0f} MB/s")
      print(f"median staging: {statistics.median(rates):.0f} MB/s for "
            f"{total / 2**20:,.0f} MB (target >= 100)")


if __name__ == "__main__":
  main()
