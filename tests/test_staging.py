"""Prepared data on object storage (data.dir=s3://... or gs://...), against local S3 and GCS
servers (tests/object_store.py): staged once, checked by sha256, trained on."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, TEST_RUN, metric_rows
from object_store import bucket, gcs_server, s3_server, upload
from slw_jax import config_lib, input_pipeline, staging, trainer
from slw_jax.data_spec import CorpusError

FIXTURES = (bucket, gcs_server, s3_server)  # Used by name as the tests' arguments.


def _in_bucket(make_config, bucket, tmp_path, **overrides):
  local = make_config()
  input_pipeline.ensure_prepared(local, log=lambda *_: None)
  fs = upload(local.data.dir, f"{bucket}/data")
  return local, make_config(data__dir=f"{bucket}/data", data__cache_dir=str(tmp_path / "cache"),
                            **overrides), fs


def test_data_in_a_bucket_is_staged_once_and_read_as_the_local_copy(make_config, bucket,
                                                                     tmp_path, monkeypatch):
  monkeypatch.setattr(staging, "CHUNK", 2**16)  # Many range requests, 3 at a time: in order.
  monkeypatch.setattr(staging, "PARALLEL", 3)
  local, remote, _ = _in_bucket(make_config, bucket, tmp_path)
  lines = []
  meta, tokens = input_pipeline.open_token_splits(remote, log=lines.append)
  assert len([l for l in lines if l.startswith("staging ")]) == 2  # train.bin, validation.bin
  _, local_tokens = input_pipeline.open_token_splits(local, log=lambda *_: None)
  for split in tokens:
    np.testing.assert_array_equal(tokens[split], local_tokens[split])
  assert staging.local_dir(remote.data).startswith(str(tmp_path / "cache"))
  again = []
  input_pipeline.open_token_splits(remote, log=again.append)
  assert not [l for l in again if l.startswith("staging ")]  # Verified copies are kept.


def test_a_damaged_object_is_refused_and_nothing_half_copied_is_kept(make_config, bucket,
                                                                     tmp_path):
  _, remote, fs = _in_bucket(make_config, bucket, tmp_path)
  original = fs.cat_file(f"{bucket}/data/train.bin")
  damaged = bytearray(original)
  damaged[len(damaged) // 2] ^= 0xFF  # Same size, one byte flipped.
  fs.pipe_file(f"{bucket}/data/train.bin", bytes(damaged))
  with pytest.raises(CorpusError, match=r"train.bin does not match its metadata.json .* prepare "
                     r"and copy the data again") as raised:
    input_pipeline.open_token_splits(remote, log=lambda *_: None)
  assert "\n" not in str(raised.value)
  staged = staging.local_dir(remote.data)
  assert sorted(os.listdir(staged)) == [".lock"]  # No partial file, no metadata: not staged.


def test_a_copy_cut_off_or_a_changed_bucket_never_leaves_a_cache_read_as_staged(
    make_config, bucket, tmp_path, monkeypatch):
  _, remote, fs = _in_bucket(make_config, bucket, tmp_path)
  staged = staging.local_dir(remote.data)
  input_pipeline.open_token_splits(remote, log=lambda *_: None)  # Staged whole once.
  original = fs.cat_file(f"{bucket}/data/train.bin")
  fs.pipe_file(f"{bucket}/data/train.bin", original[::-1])  # The bucket's file changed.
  os.remove(os.path.join(staged, "train.bin.sha256"))  # As if never verified: fetched again.
  with pytest.raises(CorpusError, match="train.bin does not match"):
    input_pipeline.open_token_splits(remote, log=lambda *_: None)
  assert "metadata.json" not in os.listdir(staged)  # Not complete any more.
  fs.pipe_file(f"{bucket}/data/train.bin", original)

  def cut_off(*args):
    yield b"x" * 10
    raise staging._RemoteFailure(ConnectionResetError("connection reset by peer"))  # noqa
  monkeypatch.setattr(staging, "_ranges", cut_off)
  with pytest.raises(CorpusError, match=r"copying train.bin failed: connection reset by peer"):
    input_pipeline.open_token_splits(remote, log=lambda *_: None)
  assert not [name for name in os.listdir(staged) if name.endswith(".partial")]
  assert "metadata.json" not in os.listdir(staged)


def test_a_read_only_cache_is_one_line_naming_it(make_config, bucket, tmp_path):
  _, remote, _ = _in_bucket(make_config, bucket, tmp_path)
  (tmp_path / "cache").write_text("a file where the cache directory belongs")
  with pytest.raises(CorpusError, match=r"^config.data.cache_dir='\S+/cache' is not a writable "
                     r"directory"):
    input_pipeline.open_token_splits(remote, log=lambda *_: None)


@pytest.mark.parametrize("case", ["no bucket", "no prepared data", pytest.param(
    "unreachable endpoint", marks=pytest.mark.slow)])  # gcsfs retries for about 30 s.
def test_bad_buckets_are_one_line_errors_naming_the_url(make_config, bucket, tmp_path,
                                                        monkeypatch, case):
  url = {"no bucket": bucket + "-missing/data", "no prepared data": f"{bucket}/nothing",
         "unreachable endpoint": f"{bucket}/data"}[case]
  if case == "unreachable endpoint":
    dead = "http://127.0.0.1:9"  # Nothing listens on the discard port.
    monkeypatch.setenv("AWS_ENDPOINT_URL" if bucket.startswith("s3") else
                       "STORAGE_EMULATOR_HOST", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("FSSPEC_GCS_RETRIES", "1")
  c = make_config(data__dir=url, data__cache_dir=str(tmp_path / "cache"))
  message = {"no bucket": ": the bucket 'slw-test-bucket-missing' does not exist",
             "no prepared data": r" holds no prepared data \(metadata.json missing\)",
             "unreachable endpoint": " cannot be read: .*127.0.0.1"}[case]
  with pytest.raises(CorpusError, match=rf"^config.data.dir='{url}'{message}") as raised:
    input_pipeline.open_token_splits(c, log=lambda *_: None)
  assert "\n" not in str(raised.value)


@pytest.mark.slow
def test_a_run_trains_on_data_in_a_bucket_as_on_the_local_copy(make_config, bucket, tmp_path):
  """python -m slw_jax.main with data.dir in the bucket trains on exactly the local tokens."""
  local, remote, _ = _in_bucket(make_config, bucket, tmp_path)
  overrides = {k: v for k, v in TEST_RUN.items() if v is not None}
  overrides.update({"train_steps": 6, "data.source": local.data.source,
                    "data.dir": remote.data.dir, "data.cache_dir": remote.data.cache_dir,
                    "compile.cache_dir": local.compile.cache_dir})
  done = subprocess.run(
      [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / 'remote'}", *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"staging {bucket}/data/train.bin" in done.stdout
  same_here = dict(overrides, **{"data.dir": local.data.dir, "data.cache_dir": None})
  trainer.Trainer(config_lib.validate(config_lib.load_config_file(
      str(REPO / "configs/tiny.py"), same_here)), str(tmp_path / "local")).run()
  losses = [[r["loss"] for r in metric_rows(tmp_path / w)] for w in ("remote", "local")]
  assert len(losses[0]) == 6 and losses[0] == losses[1]  # Bitwise: the same tokens.
