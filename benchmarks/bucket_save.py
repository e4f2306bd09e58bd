"""Checkpoint saves of the tiny run to a local S3 server against local disk (issue 26; target:
at most 2x the local-disk save).

A moto S3 server runs in its own process on 127.0.0.1 (a real endpoint is another machine:
it does not share this process's GIL). The tiny config's train state (configs/tiny.py, one
device) is saved `--repeats` times with checkpoint.Checkpoints, as the trainer saves it:
- local disk: orbax's save until it is on disk (`wait`);
- the bucket: the same save into a --workdir=s3:// run's mirror, then the copy the background
  thread makes (slw_jax.remote_run: every file, sha256, the commit record, the run record).
Reported: the median of each, their ratio, and the requests one checkpoint costs. The training
loop waits for neither the copy nor (checkpoint.async_save) the save itself.

    .venv/bin/python benchmarks/bucket_save.py [--repeats=5]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import local_s3  # noqa: E402  pylint: disable=g-import-not-at-top


def _tiny_state():
  import jax  # pylint: disable=g-import-not-at-top
  from slw_jax import config_lib, train_step  # pylint: disable=g-import-not-at-top
  c = config_lib.validate(config_lib.load_config_file(
      os.path.join(REPO, "configs/tiny.py"), {"mesh.data": 1, "mesh.tensor": 1}))
  placed = train_step.on_mesh(c, jax.devices()[:1])
  init = train_step.make_init_fn(c, placed.optimizer, placed.model_cfg)
  return jax.jit(init, out_shardings=placed.layout.state)()


def _timed_save(checkpoints, step, state) -> float:
  started = time.perf_counter()
  checkpoints.save(step, state, {"step": step})
  checkpoints.wait()
  return time.perf_counter() - started


class _Counting:
  """Counts the requests the copies make (calls of the filesystem's methods)."""

  def __init__(self, fs):
    self.calls = {}
    for name in ("pipe_file", "put", "rm_file", "rm", "exists"):
      real = getattr(fs, name)

      def counted(*args, _real=real, _name=name, **kwargs):
        paths = args[0] if isinstance(args[0], list) else [args[0]]
        self.calls[_name] = self.calls.get(_name, 0) + len(paths)
        return _real(*args, **kwargs)
      setattr(fs, name, counted)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  from slw_jax import buckets, checkpoint, remote_run  # pylint: disable=g-import-not-at-top
  with local_s3.server():
    buckets.filesystem("s3://bench-bucket", "bench").mkdir("s3://bench-bucket")
    state = _tiny_state()
    with tempfile.TemporaryDirectory() as scratch:
      local = checkpoint.Checkpoints(os.path.join(scratch, "local", "checkpoints"), keep=2)
      run_dir = remote_run.open_run("s3://bench-bucket/run", os.path.join(scratch, "mirror"),
                                    log=lambda _: None)
      mirrored = checkpoint.Checkpoints(os.path.join(run_dir.local, "checkpoints"), keep=2)
      counting = _Counting(run_dir.fs)
      disk, bucket, copies = [], [], []
      for step in range(1, args.repeats + 2):  # The first of each: warm-up, not counted.
        on_disk = _timed_save(local, step, state)
        in_mirror = _timed_save(mirrored, step, state)
        started = time.perf_counter()
        run_dir._sync()  # pylint: disable=protected-access  # The background thread's copy.
        copy = time.perf_counter() - started
        if step > 1:
          disk.append(on_disk)
          bucket.append(in_mirror + copy)
          copies.append(copy)
        if step == 2:
          counting.calls.clear()  # From here: one checkpoint's copy, an old one removed.
      files = len(remote_run._files_under(os.path.join(run_dir.local, "checkpoints",  # pylint: disable=protected-access
                                                      str(args.repeats + 1))))
      size = sum(os.path.getsize(os.path.join(p, n)) for p, _, names in
                 os.walk(os.path.join(run_dir.local, "checkpoints", str(args.repeats + 1)))
                 for n in names)
      per_checkpoint = {k: v / (args.repeats - 1) for k, v in counting.calls.items()}
      local.close()
      mirrored.close()
    print(f"tiny train state: {size / 2**20:.1f} MB in {files} files per checkpoint")
    print(f"local disk save: median {statistics.median(disk) * 1e3:.0f} ms")
    print(f"save to s3:// (save + copy): median {statistics.median(bucket) * 1e3:.0f} ms "
          f"(copy alone {statistics.median(copies) * 1e3:.0f} ms)")
    print(f"ratio: {statistics.median(bucket) / statistics.median(disk):.2f}x (target <= 2)")
    print("requests per checkpoint (with the logs unchanged): "
          + ", ".join(f"{k} {v:g}" for k, v in sorted(per_checkpoint.items())))


if __name__ == "__main__":
  main()
