"""Whole runs of `slw_jax.main` with a gs:// or s3:// --workdir (a local S3 server and a GCS
emulator, tests/object_store.py): SIGKILLed, resumed on the same machine, preempted (SIGTERM),
its newest checkpoint damaged in the bucket, then resumed on another machine (a new mirror)
to the end: every loss, evaluation and rollback equals a local run's, bit for bit."""

import json
import os
import signal

import pytest

from object_store import bucket, gcs_server, s3_server
from runs import command as _command, finish as _finish, run as _run, start as _start
from slw_jax import buckets
from test_kill_resume import _same_run, _wait_for

FIXTURES = (bucket, gcs_server, s3_server)  # Used by name as the tests' arguments.


@pytest.fixture(scope="module")
def reference(session_config, tmp_path_factory) -> str:
  """A local run of the same command, never stopped."""
  workdir = str(tmp_path_factory.mktemp("bucket_reference"))
  _run(_command(session_config, workdir))
  return workdir


def _mirrored(make_config, url, mirror) -> list[str]:
  return _command(make_config, url, checkpoint__upload_every_s=0.2) + [f"--mirror_dir={mirror}"]


def _steps_done(mirror_root, url) -> int:
  path = os.path.join(mirror_root, buckets.cache_name(url), "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if '"loss"' in line)


def _commits(fs, url) -> list[int]:
  return sorted(int(p.rsplit("/", 1)[1][:-5]) for p in fs.find(f"{url}/commits"))


def _download_logs(fs, url, target) -> str:
  os.makedirs(target)
  for name in ("metrics.jsonl", "events.jsonl", "summary.json"):
    fs.get_file(f"{url}/{name}", os.path.join(target, name))
  return target


def test_a_run_in_a_bucket_killed_preempted_and_damaged_ends_as_if_never_stopped(
    make_config, reference, bucket, tmp_path):
  url, fs = f"{bucket}/runs/tiny", buckets.filesystem(bucket, "bucket")
  machine_a, machine_b = str(tmp_path / "a"), str(tmp_path / "b")
  command = _mirrored(make_config, url, machine_a)

  process = _start(command)  # SIGKILL once a checkpoint is in the bucket.
  _wait_for(process, lambda: _steps_done(machine_a, url) >= 20 and _commits(fs, url))
  process.kill()
  _finish(process)
  assert process.returncode == -signal.SIGKILL

  process = _start(command)  # The same machine, preempted: exit 0, its save in the bucket.
  before = _steps_done(machine_a, url)
  _wait_for(process, lambda: _steps_done(machine_a, url) > before + 15)
  process.send_signal(signal.SIGTERM)
  output = _finish(process)
  assert process.returncode == 0, output
  stopped = json.loads(fs.cat_file(f"{url}/summary.json"))["steps"]
  assert max(_commits(fs, url)) == stopped, output

  newest = max(_commits(fs, url))  # Damaged in the bucket: another machine falls back.
  files = json.loads(fs.cat_file(f"{url}/commits/{newest}.json"))["files"]
  largest = max(files, key=lambda rel: files[rel][0])
  data = bytearray(fs.cat_file(f"{url}/checkpoints/{newest}/{largest}"))
  data[len(data) // 2] ^= 0xFF
  fs.pipe_file(f"{url}/checkpoints/{newest}/{largest}", bytes(data))
  output = _run(_mirrored(make_config, url, machine_b))
  assert f"checkpoint {newest} in {url}/checkpoints is damaged" in output, output
  assert f"unreadable_checkpoints/step_{newest}/{largest}" in [
      p.split("/runs/tiny/", 1)[1] for p in fs.find(url)]

  _same_run(reference, _download_logs(fs, url, str(tmp_path / "from_bucket")))
