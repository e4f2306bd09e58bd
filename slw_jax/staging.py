"""Prepared data on object storage (`data.dir=gs://...`, `s3://...`): staged to local disk once.

The loader memory-maps token files, which needs a local file: a `data.dir` URL is copied to
`data.cache_dir/<bucket path>` (default ~/.cache/slw_jax/data) before training, each file
streamed to a temporary name while its sha256 is computed, checked against the remote
`metadata.json`, then renamed into place. `metadata.json` is written last, so an interrupted
staging is never read as staged; a file already staged with the right size and digest is not
fetched again (`.sha256` beside it records the verified digest).

Object stores are reached through fsspec (s3fs, gcsfs), with each SDK's own settings
(`slw_jax.buckets`).
A bucket that does not exist, missing credentials, an unreachable endpoint or a URL without
prepared data is one line naming the URL, before training.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import tempfile

from slw_jax import buckets, errors, run_log
from slw_jax.data_spec import METADATA, SPLITS, CorpusError

CHUNK = 256 * 2**20  # Bytes per range request (per-request overhead dominates smaller ones).
PARALLEL = 1  # Range requests in flight at once, plus the next window fetched while one is
# hashed and written: 1 x 256 MB with that prefetch was the fastest of 11 settings against the
# local S3 server (benchmarks/stage_speed.py, RESULTS.md); at most 512 MB in memory.


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "slw_jax", "data")


def local_dir(d) -> str:
  """Where `data.dir` is read from: itself when local, its staged copy when a URL."""
  if not errors.is_url(d.dir):
    return d.dir
  return os.path.join(os.path.expanduser(d.cache_dir or default_cache_dir()),
                      buckets.cache_name(d.dir))


def filesystem(url: str):
  """The fsspec filesystem of `url`, a `data.dir`."""
  return buckets.filesystem(url, "config.data.dir", CorpusError)


def _remote_metadata(fs, url: str) -> dict:
  path = f"{url.rstrip('/')}/{METADATA}"
  try:
    if not fs.exists(path):
      bucket = buckets.bucket_name(url)
      if not fs.exists(f"{url.partition('://')[0]}://{bucket}"):
        raise CorpusError(f"config.data.dir={url!r}: the bucket {bucket!r} does not exist (or "
                          "these credentials cannot see it)")
      raise CorpusError(f"config.data.dir={url!r} holds no prepared data ({METADATA} missing): "
                        "prepare it locally (python -m slw_jax.prepare) and copy the directory "
                        "there")
    with fs.open(path, "rb") as f:
      return json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CorpusError(f"{path} is unreadable ({errors.one_line(error, 100)})") from None
  except buckets.remote_errors() as error:
    raise CorpusError(f"config.data.dir={url!r} cannot be read: "
                      f"{errors.one_line(error, 200)}") from None


def _is_staged(path: str, size: int, sha256: str) -> bool:
  try:
    with open(path + ".sha256") as f:
      return os.path.getsize(path) == size and f.read().strip() == sha256
  except OSError:
    return False


def _ranges(fs, remote: str, size: int):
  """The bytes of `remote` in order, PARALLEL ranges of CHUNK bytes requested at once (one
  stream per request is what limits an object store), the next window requested while this
  one is hashed and written: at most 2 x PARALLEL x CHUNK in memory."""
  starts = list(range(0, size, CHUNK))
  windows = [starts[first:first + PARALLEL] for first in range(0, len(starts), PARALLEL)]

  def fetch(window):
    try:
      return fs.cat_ranges([remote] * len(window), window,
                           [min(start + CHUNK, size) for start in window])
    except buckets.remote_errors() as error:
      raise _RemoteFailure(error) from error

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="slw-stage") as ahead:
    pending = ahead.submit(fetch, windows[0]) if windows else None
    for index in range(len(windows)):
      chunks = pending.result()
      pending = ahead.submit(fetch, windows[index + 1]) if index + 1 < len(windows) else None
      for chunk in chunks:
        if isinstance(chunk, BaseException):  # cat_ranges returns a failed range's error.
          raise _RemoteFailure(chunk) from chunk
        yield chunk


class _RemoteFailure(Exception):
  """A request to the object store failed (told apart from local disk errors)."""


def _fetch(fs, remote: str, local: str, size: int, sha256: str):
  """Copies `remote` to `local` through a temporary file, checking size and digest; the
  verified digest is recorded beside it only once the file is in place."""
  digest, copied = hashlib.sha256(), 0
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(local) + ".", suffix=".partial",
                             dir=os.path.dirname(local))
  try:
    with os.fdopen(fd, "wb") as target:
      for chunk in _ranges(fs, remote, size):
        digest.update(chunk)
        target.write(chunk)
        copied += len(chunk)
    if copied != size or digest.hexdigest() != sha256:
      raise CorpusError(f"{remote} does not match its {METADATA} ({copied:,} bytes, sha256 "
                        f"{digest.hexdigest()[:12]}...; expected {size:,} bytes, sha256 "
                        f"{sha256[:12]}...): prepare and copy the data again")
    if os.path.exists(local + ".sha256"):
      os.remove(local + ".sha256")  # A crash between the two steps leaves no stale record.
    os.replace(tmp, local)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  run_log.replace_durably(local + ".sha256", lambda f: f.write(sha256))


def _check_metadata(meta, url: str):
  """The remote metadata names each split's file (a plain name) and digest."""
  for split in SPLITS:
    info = meta.get("splits", {}).get(split) if isinstance(meta, dict) else None
    name = info.get("file") if isinstance(info, dict) else None
    if (not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", "..")
        or not isinstance(info.get("sha256"), str)):
      raise CorpusError(f"{url.rstrip('/')}/{METADATA} does not describe the {split!r} split "
                        "(its file name and sha256): prepare and copy the data again")


def _make_cache(target: str, cache_dir):
  try:
    os.makedirs(target, exist_ok=True)
    with tempfile.TemporaryFile(dir=target):
      pass
  except OSError as error:
    raise CorpusError(f"config.data.cache_dir={cache_dir or default_cache_dir()!r} is not a "
                      f"writable directory ({error.strerror or errors.one_line(error)}): the "
                      "data.dir URL is staged there") from None


def stage(d, log=print) -> str:
  """Copies the prepared data at URL `d.dir` to `local_dir(d)` (what is not there yet) and
  returns that directory. Local `data.dir`s are returned as they are. Processes staging the
  same cache at once take turns (a lock file); the second finds the files staged."""
  if not errors.is_url(d.dir):
    return d.dir
  fs, target = filesystem(d.dir), local_dir(d)
  meta = _remote_metadata(fs, d.dir)
  _check_metadata(meta, d.dir)
  _make_cache(target, d.cache_dir)
  with open(os.path.join(target, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(target, METADATA)):
      os.remove(os.path.join(target, METADATA))  # Complete again only once every file is.
    for name in os.listdir(target):  # What a staging killed mid-copy left (under the lock).
      if name.endswith((".partial", ".tmp")):
        os.remove(os.path.join(target, name))
    for split in SPLITS:
      _stage_file(fs, d, target, meta["splits"][split], log)
    run_log.write_json(os.path.join(target, METADATA), meta)  # Last: now it is complete.
  return target


def _stage_file(fs, d, target: str, info: dict, log):
  remote, local = f"{d.dir.rstrip('/')}/{info['file']}", os.path.join(target, info["file"])
  try:
    try:
      size = fs.size(remote)
    except buckets.remote_errors() as error:
      raise _RemoteFailure(error) from error
    if _is_staged(local, size, info["sha256"]):
      return
    log(f"staging {remote} ({size / 2**20:,.1f} MB) to {local}")
    _fetch(fs, remote, local, size, info["sha256"])
  except _RemoteFailure as failure:
    raise CorpusError(f"config.data.dir={d.dir!r}: copying {info['file']} failed: "
                      f"{errors.one_line(failure.args[0], 200)}") from None
