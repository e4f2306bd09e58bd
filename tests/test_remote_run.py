"""Run directories on object storage (slw_jax.remote_run), against a local S3 server and a GCS
emulator (tests/object_store.py): what a sync copies and in which order, which mirror a restart
trusts, damaged and cut-short checkpoints in the bucket, bad buckets, and a training loop that
never waits for the bucket. Whole runs killed and resumed: tests/faults/test_bucket_runs.py."""

import json
import os
import threading
import time

import pytest

from object_store import bucket, gcs_server, s3_server
from slw_jax import errors, remote_run

FIXTURES = (bucket, gcs_server, s3_server)  # Used by name as the tests' arguments.


def _write(root, rel, data=b"x"):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data if isinstance(data, bytes) else data.encode())


def _checkpoint(root, step, payload=b"weights"):
  """A stand-in for orbax's step directory (what remote_run copies: its files)."""
  _write(root, f"checkpoints/{step}/state/array.bin", payload * 100 + str(step).encode())
  _write(root, f"checkpoints/{step}/meta/record.json", json.dumps({"step": step}))


def _objects(run_dir) -> dict[str, int]:
  """{path under the run's URL: size} of every object there."""
  prefix = run_dir.url.split("://", 1)[1] + "/"
  return {path.removeprefix(prefix): int(info["size"])
          for path, info in run_dir.fs.find(run_dir.url, detail=True).items()}


def _open(url, mirror, lines=None):
  return remote_run.open_run(url, str(mirror), log=(lines.append if lines is not None
                                                   else lambda _: None))


def test_a_sync_copies_files_and_checkpoints_commit_records_last(bucket, tmp_path):
  url = f"{bucket}/run"
  run_dir = _open(url, tmp_path / "a")
  _write(run_dir.local, "metrics.jsonl", '{"step": 0}\n')
  _write(run_dir.local, "tb/events.out", b"tb")
  _checkpoint(run_dir.local, 5)
  _write(run_dir.local, "checkpoints/10.orbax-checkpoint-tmp-1/state/x", b"half")  # In progress.
  calls = []
  for name in ("pipe_file", "put"):
    real = getattr(run_dir.fs, name)
    setattr(run_dir.fs, name, lambda path, *a, _real=real, _name=name, **k: (
        calls.append((_name, path)), _real(path, *a, **k))[1])
  run_dir.close()
  objects = _objects(run_dir)
  assert {"metrics.jsonl", "tb/events.out", "checkpoints/5/state/array.bin",
          "checkpoints/5/meta/record.json", "commits/5.json", remote_run.RECORD} == set(objects)
  order = [name if kind == "pipe_file" else "checkpoint files" for kind, name in calls]
  assert order.index("checkpoint files") < order.index(f"{url}/commits/5.json") < order.index(
      f"{url}/{remote_run.RECORD}") == len(order) - 1
  record = json.loads(run_dir.fs.cat_file(f"{url}/commits/5.json"))
  assert record["files"]["state/array.bin"][0] == objects["checkpoints/5/state/array.bin"]

  # Another machine gets the same files; a checkpoint orbax removed leaves the bucket too.
  other = _open(url, tmp_path / "b")
  for rel in ("metrics.jsonl", "tb/events.out", "checkpoints/5/state/array.bin"):
    assert open(os.path.join(other.local, rel), "rb").read() == open(
        os.path.join(run_dir.local, rel), "rb").read()
  _checkpoint(other.local, 15)
  os.system(f"rm -r {os.path.join(other.local, 'checkpoints', '5')}")
  other.close()
  objects = _objects(other)
  assert "commits/15.json" in objects and "commits/5.json" not in objects
  assert not [rel for rel in objects if rel.startswith("checkpoints/5/")]


def test_the_mirror_that_wrote_last_is_copied_first_and_a_stale_one_replaced(bucket, tmp_path):
  url = f"{bucket}/run"
  first = _open(url, tmp_path / "a")
  _write(first.local, "metrics.jsonl", "1\n")
  first.close()
  # Killed before its next copy: the disk holds more than the bucket.
  _write(first.local, "metrics.jsonl", "1\n2\n")
  _checkpoint(first.local, 5)
  lines = []
  again = _open(url, tmp_path / "a", lines)
  assert any("holds and" in line for line in lines), lines
  assert again.fs.cat_file(f"{url}/metrics.jsonl") == b"1\n2\n"  # Nothing the disk held lost.
  assert "commits/5.json" in _objects(again)

  elsewhere = _open(url, tmp_path / "b")  # A new machine continues the run ...
  _write(elsewhere.local, "metrics.jsonl", "1\n2\n3\n")
  elsewhere.close()
  back = _open(url, tmp_path / "a")  # ... so the first machine's mirror is stale: replaced.
  assert open(os.path.join(back.local, "metrics.jsonl")).read() == "1\n2\n3\n"
  assert back.fs.cat_file(f"{url}/metrics.jsonl") == b"1\n2\n3\n"


def test_a_new_writer_killed_before_its_first_copy_keeps_its_mirror(bucket, tmp_path):
  """The bucket names the new mirror its writer before anything else is written: a restart
  there trusts it (even with nothing copied yet), a restart elsewhere does not."""
  url = f"{bucket}/run"
  first = _open(url, tmp_path / "a")
  _write(first.local, "metrics.jsonl", "1\n")
  first.close()
  taking_over = _open(url, tmp_path / "b")
  _write(taking_over.local, "metrics.jsonl", "1\n2\n")  # Killed: never copied.
  _checkpoint(taking_over.local, 5)
  again = _open(url, tmp_path / "b")
  assert open(os.path.join(again.local, "metrics.jsonl")).read() == "1\n2\n"
  assert again.fs.cat_file(f"{url}/metrics.jsonl") == b"1\n2\n"
  assert "commits/5.json" in _objects(again)
  fresh = _open(f"{bucket}/new", tmp_path / "c")  # Killed before any file was copied ...
  _write(fresh.local, "metrics.jsonl", "1\n")
  assert _open(f"{bucket}/new", tmp_path / "c").fs.cat_file(f"{bucket}/new/metrics.jsonl") == \
      b"1\n"  # ... is not refused as a prefix of someone else's files.


def test_the_newest_committed_checkpoint_stays_until_a_newer_one_is_committed(bucket, tmp_path):
  """checkpoint.keep=1 with a copy slower than the saves: orbax removed k before its copy
  finished; k-1 must stay in the bucket, or a restart there would find no checkpoint."""
  url = f"{bucket}/run"
  run_dir = _open(url, tmp_path / "a")
  _checkpoint(run_dir.local, 5)
  run_dir.close()
  os.system(f"rm -r {os.path.join(run_dir.local, 'checkpoints', '5')}")
  run_dir.close()
  assert "commits/5.json" in _objects(run_dir)
  _checkpoint(run_dir.local, 10)
  run_dir.close()
  objects = _objects(run_dir)
  assert "commits/10.json" in objects and "commits/5.json" not in objects


def test_a_file_removed_from_the_mirror_leaves_the_bucket(bucket, tmp_path):
  """The rollback journal, once spent, must not come back on another machine."""
  url = f"{bucket}/run"
  run_dir = _open(url, tmp_path / "a")
  _write(run_dir.local, "rollback_journal.json", "{}")
  run_dir.close()
  assert "rollback_journal.json" in _objects(run_dir)
  run_dir = _open(url, tmp_path / "a")
  os.remove(os.path.join(run_dir.local, "rollback_journal.json"))
  _write(run_dir.local, "metrics.jsonl", "1\n")
  run_dir.close()
  assert "rollback_journal.json" not in _objects(run_dir)
  assert not os.path.exists(os.path.join(_open(url, tmp_path / "b").local,
                                         "rollback_journal.json"))


def test_a_damaged_or_cut_short_checkpoint_in_the_bucket_is_never_resumed(bucket, tmp_path):
  url = f"{bucket}/run"
  run_dir = _open(url, tmp_path / "a")
  _checkpoint(run_dir.local, 5)
  _checkpoint(run_dir.local, 10)
  run_dir.close()
  fs = run_dir.fs
  damaged = bytearray(fs.cat_file(f"{url}/checkpoints/10/state/array.bin"))
  damaged[7] ^= 0xFF
  fs.pipe_file(f"{url}/checkpoints/10/state/array.bin", bytes(damaged))
  fs.pipe_file(f"{url}/checkpoints/15/state/array.bin", b"cut short")  # No commit record.

  lines = []
  resumed = _open(url, tmp_path / "b", lines)
  assert sorted(os.listdir(os.path.join(resumed.local, "checkpoints"))) == ["5"]
  aside = os.path.join(resumed.local, "unreadable_checkpoints", "step_10", "state", "array.bin")
  assert open(aside, "rb").read() == bytes(damaged)  # Kept for inspection.
  assert any("checkpoint 10" in line and "is damaged" in line and "sha256" in line
             for line in lines), lines
  objects = _objects(resumed)
  assert not [rel for rel in objects if rel.startswith("checkpoints/15/")]  # Deleted at start.
  assert "commits/10.json" in objects  # Until its local copy is in the bucket too.
  resumed.close()
  objects = _objects(resumed)
  assert "unreadable_checkpoints/step_10/state/array.bin" in objects  # Moved in the bucket.
  assert "commits/10.json" not in objects and "commits/5.json" in objects
  assert not [rel for rel in objects if rel.startswith("checkpoints/10/")]
  reader = remote_run.open_for_reading(url, str(tmp_path / "b"))
  assert os.listdir(os.path.join(reader.local, "checkpoints")) == ["5"]


def test_a_reader_fetches_only_the_checkpoint_it_reads_and_writes_back_its_file(bucket, tmp_path):
  url = f"{bucket}/run"
  run_dir = _open(url, tmp_path / "a")
  _checkpoint(run_dir.local, 5)
  _checkpoint(run_dir.local, 10)
  _write(run_dir.local, "metrics.jsonl", "1\n")
  run_dir.close()
  reader = remote_run.open_for_reading(url, str(tmp_path / "a"), 5)
  assert reader.local != run_dir.local  # Never the writer's mirror (a run may be live).
  assert os.listdir(os.path.join(reader.local, "checkpoints")) == ["5"]
  _write(reader.local, "eval/val.json", "{}")
  reader.upload("eval/val.json")
  assert "eval/val.json" in _objects(run_dir)
  logs = remote_run.open_for_reading(url, str(tmp_path / "c"), None)
  assert not os.path.exists(os.path.join(logs.local, "checkpoints"))
  assert open(os.path.join(logs.local, "metrics.jsonl")).read() == "1\n"


@pytest.mark.parametrize("case", [
    "no bucket", "read-only bucket", "foreign files", "empty for a reader", "no bucket named"])
def test_bad_buckets_are_one_line_before_anything_is_written(bucket, tmp_path, monkeypatch, case):
  url = {"no bucket": bucket + "-missing/run", "no bucket named": bucket.split("//")[0] + "//",
         }.get(case, f"{bucket}/run")
  if case == "foreign files":
    remote_run.buckets.filesystem(bucket, "x").pipe_file(f"{url}/notes.txt", b"mine")
  if case == "read-only bucket":
    import fsspec  # pylint: disable=g-import-not-at-top
    refused = PermissionError("Access Denied")
    monkeypatch.setattr(type(fsspec.core.url_to_fs(bucket)[0]), "pipe_file",
                        lambda *a, **k: (_ for _ in ()).throw(refused))
  opener = remote_run.open_for_reading if case == "empty for a reader" else remote_run.open_run
  with pytest.raises(errors.UsageError) as raised:
    opener(url, str(tmp_path / "m"))
  message = {"no bucket": f"the bucket '{bucket.split('//')[1]}-missing' does not exist",
             "read-only bucket": "cannot be written: Access Denied",
             "foreign files": "holds files but no run of slw_jax",
             "empty for a reader": "is empty: pass the URL a run wrote",
             "no bucket named": "names no bucket"}[case]
  assert message in str(raised.value) and "\n" not in str(raised.value)
  assert not os.path.exists(tmp_path / "m")


# S3 only: the GCS emulator takes anyone, and gcsfs retries an unreachable endpoint for about
# a minute (its error is tested through staging, tests/test_staging.py).
@pytest.mark.parametrize("bucket", ["s3"], indirect=True)
@pytest.mark.parametrize("case", ["missing credentials", "unreachable endpoint"])
def test_missing_credentials_and_an_unreachable_endpoint_are_one_line(bucket, tmp_path,
                                                                       monkeypatch, case):
  if case == "missing credentials":
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
      monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
  else:  # Nothing listens on the discard port.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
  with pytest.raises(errors.UsageError) as raised:
    remote_run.open_run(f"{bucket}/run", str(tmp_path / "m"))
  assert str(raised.value).startswith(f"--workdir='{bucket}/run' cannot be")
  assert {"missing credentials": "Unable to locate credentials",
          "unreachable endpoint": "127.0.0.1:9"}[case] in str(raised.value)
  assert "\n" not in str(raised.value) and not os.path.exists(tmp_path / "m")


@pytest.mark.slow  # Trains (about 25 s a backend).
def test_the_training_loop_never_waits_for_the_bucket(make_config, bucket, tmp_path):
  """Every copy to the bucket is held back until the run has finished training: the run
  still trains to its last step; only `close` (the final save's copy) waits."""
  from slw_jax import trainer  # pylint: disable=g-import-not-at-top
  c = make_config(checkpoint__every_steps=2, train_steps=12)
  run_dir = _open(f"{bucket}/run", tmp_path / "mirror")
  release, held = threading.Event(), []
  real_put = run_dir.fs.put

  def held_put(*args, **kwargs):
    held.append(time.monotonic())
    assert release.wait(90), "the copy was never released"
    return real_put(*args, **kwargs)

  run_dir.fs.put = held_put
  run_dir.sync_in_background(0.05)
  summary = trainer.Trainer(c, run_dir.local).run()
  trained = time.monotonic()
  assert summary["completed"] and held, "no copy was attempted while the run trained"
  assert trained - held[0] < 60  # Finished while the first copy was still held.
  release.set()
  run_dir.close()
  objects = _objects(run_dir)
  assert f"commits/{c.train_steps}.json" in objects
  assert run_dir.fs.cat_file(f"{bucket}/run/metrics.jsonl") == open(
      os.path.join(run_dir.local, "metrics.jsonl"), "rb").read()


@pytest.mark.slow  # Trains, evaluates, plots and exports (about 60 s).
@pytest.mark.parametrize("bucket", ["gs"], indirect=True)  # One backend: both run the same RunDir.
def test_evaluate_report_and_export_read_and_write_a_bucket(make_config, bucket, tmp_path):
  from slw_jax import convert, evaluate, report, trainer  # pylint: disable=g-import-not-at-top
  url, mirrors = f"{bucket}/trained", str(tmp_path / "mirrors")
  run_dir = _open(url, tmp_path / "trainer_mirror")
  trainer.Trainer(make_config(), run_dir.local).run()
  run_dir.close()
  fs = run_dir.fs

  result = evaluate.run(url, "val", None, None, None, 4, 1, mirrors)
  assert json.loads(fs.cat_file(f"{url}/eval/val.json")) == json.loads(json.dumps(result))
  path = report.build([url], f"{bucket}/reports/one", mirror_dir=mirrors)
  assert path == f"{bucket}/reports/one/report.md"
  text = fs.cat_file(path).decode()
  assert "trained" in text and "val" in text  # The run by its name, its evaluation.
  assert fs.exists(f"{bucket}/reports/one/{next(iter(report.PLOTS))}")
  weights = convert.export_hf(url, None, str(tmp_path / "hf"), mirrors, log=lambda _: None)
  assert os.path.getsize(weights) > 0


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["s3"], indirect=True)  # The layout is the backends' own.
def test_a_tuner_in_a_bucket_keeps_every_trial_there(make_config, bucket, tmp_path):
  """tune's trials are runs of their own under trials/<name>/: their checkpoints are committed
  beside them, and a new machine resumes the tuner from the bucket (no trial run again)."""
  from slw_jax import tune  # pylint: disable=g-import-not-at-top
  from test_tune import _tune_config  # pylint: disable=g-import-not-at-top
  c = _tune_config(make_config, tune__seqlen_starts=(8,))
  url = f"{bucket}/tune"
  run_dir = _open(url, tmp_path / "a")
  result = tune.Tuner(c, run_dir.local, log=lambda _: None).run()
  run_dir.close()
  objects = _objects(run_dir)
  for trial in result["trials"]:
    assert any(re_commit(rel, trial["name"]) for rel in objects), trial["name"]
  assert "tune_result.json" in objects and "tune.md" in objects
  elsewhere = _open(url, tmp_path / "b")
  again = tune.Tuner(c, elsewhere.local, log=lambda _: None)
  assert set(again.done) == {t["name"] for t in result["trials"]}  # Nothing to run again.


def re_commit(rel: str, trial: str) -> bool:
  return rel.startswith(f"trials/{trial}/commits/") and rel.endswith(".json")
