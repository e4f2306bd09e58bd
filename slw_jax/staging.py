"""Prepared data on object storage (`data.dir=gs://...`, `s3://...`): staged to local disk once.

The loader memory-maps token files, which needs a local file: a `data.dir` URL is copied to
`data.cache_dir/<bucket path>` (default ~/.cache/slw_jax/data) before training, each file
streamed to a temporary name while its sha256 is computed, checked against the remote
`metadata.json`, then renamed into place. `metadata.json` is written last, so an interrupted
staging is never read as staged; a file already staged with the right size and digest is not
fetched again (`.sha256` beside it records the verified digest).

Object stores are reached through fsspec (s3fs, gcsfs), with each SDK's own settings:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` for S3;
`GOOGLE_APPLICATION_CREDENTIALS` (or the VM's service account) and `STORAGE_EMULATOR_HOST` for
GCS; `FSSPEC_<PROTOCOL>_<OPTION>` for anything else fsspec takes (e.g. FSSPEC_GCS_TOKEN=anon).
A bucket that does not exist, missing credentials, an unreachable endpoint or a URL without
prepared data is one line naming the URL, before training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from slw_jax import errors
from slw_jax.data_spec import METADATA, SPLITS, CorpusError

CHUNK = 128 * 2**20  # Bytes per range request (per-request overhead dominates smaller ones).
PARALLEL = 2  # Range requests in flight at once: 2 x 128 MB was the fastest of 8 settings
# against the local S3 server (benchmarks/stage_speed.py, RESULTS.md).
PACKAGES = {"s3": "s3fs==2026.9.0", "gs": "gcsfs==2026.10.1", "gcs": "gcsfs==2026.10.1"}


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "slw_jax", "data")


def local_dir(d) -> str:
  """Where `data.dir` is read from: itself when local, its staged copy when a URL."""
  if not errors.is_url(d.dir):
    return d.dir
  scheme, rest = d.dir.split("://", 1)
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{scheme}_{rest.strip('/')}")
  return os.path.join(os.path.expanduser(d.cache_dir or default_cache_dir()), slug)


def _remote_errors() -> tuple:
  """What a bad URL, bucket, credential or endpoint raises through fsspec's backends."""
  found = [OSError]
  try:
    from botocore import exceptions as botocore_exceptions  # pylint: disable=g-import-not-at-top
    found += [botocore_exceptions.BotoCoreError, botocore_exceptions.ClientError]
  except ImportError:
    pass
  try:
    from google.auth import exceptions as auth_exceptions  # pylint: disable=g-import-not-at-top
    found.append(auth_exceptions.GoogleAuthError)
  except ImportError:
    pass
  return tuple(found)


def filesystem(url: str):
  """The fsspec filesystem of `url` (not cached: settings read from the environment now)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  scheme = url.split("://", 1)[0]
  try:
    fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True)
  except ImportError:
    package = PACKAGES.get(scheme, f"the fsspec backend of {scheme}://")
    raise CorpusError(f"config.data.dir={url!r} needs {package}, which is not installed: "
                      f"pip install {package}") from None
  except ValueError as error:  # An unknown protocol.
    raise CorpusError(f"config.data.dir={url!r} is not a URL fsspec can read: "
                      f"{errors.one_line(error, 200)}") from None
  return fs


def _remote_metadata(fs, url: str) -> dict:
  path = f"{url.rstrip('/')}/{METADATA}"
  try:
    if not fs.exists(path):
      bucket = url.split("://", 1)[1].split("/", 1)[0]
      if not fs.exists(f"{url.split('://', 1)[0]}://{bucket}"):
        raise CorpusError(f"config.data.dir={url!r}: the bucket {bucket!r} does not exist (or "
                          "these credentials cannot see it)")
      raise CorpusError(f"config.data.dir={url!r} holds no prepared data ({METADATA} missing): "
                        "prepare it locally (python -m slw_jax.prepare) and copy the directory "
                        "there")
    with fs.open(path, "rb") as f:
      return json.loads(f.read())
  except json.JSONDecodeError as error:
    raise CorpusError(f"{path} is unreadable ({error.msg})") from None
  except _remote_errors() as error:
    raise CorpusError(f"config.data.dir={url!r} cannot be read: "
                      f"{errors.one_line(error, 200)}") from None


def _is_staged(path: str, size: int, sha256: str) -> bool:
  try:
    with open(path + ".sha256") as f:
      return os.path.getsize(path) == size and f.read().strip() == sha256
  except OSError:
    return False


def _fetch(fs, remote: str, local: str, size: int, sha256: str):
  """Copies `remote` to `local` through a temporary file, checking size and digest: PARALLEL
  ranges of CHUNK bytes are requested at once (one stream per request is what limits an
  object store), then hashed and written in order, so at most PARALLEL x CHUNK is in memory."""
  digest, copied, tmp = hashlib.sha256(), 0, local + ".partial"
  starts = list(range(0, size, CHUNK))
  with open(tmp, "wb") as target:
    for first in range(0, len(starts), PARALLEL):
      window = starts[first:first + PARALLEL]
      chunks = fs.cat_ranges([remote] * len(window), window,
                             [min(start + CHUNK, size) for start in window])
      for chunk in chunks:
        if isinstance(chunk, BaseException):  # cat_ranges returns a failed range's error.
          raise chunk
        digest.update(chunk)
        target.write(chunk)
        copied += len(chunk)
  if copied != size or digest.hexdigest() != sha256:
    os.remove(tmp)
    raise CorpusError(f"{remote} does not match its {METADATA} ({copied:,} bytes, sha256 "
                      f"{digest.hexdigest()[:12]}...; expected {size:,} bytes, sha256 "
                      f"{sha256[:12]}...): prepare and copy the data again")
  os.replace(tmp, local)
  with open(local + ".sha256", "w") as f:
    f.write(sha256)


def stage(d, log=print) -> str:
  """Copies the prepared data at URL `d.dir` to `local_dir(d)` (what is not there yet) and
  returns that directory. Local `data.dir`s are returned as they are."""
  if not errors.is_url(d.dir):
    return d.dir
  fs, target = filesystem(d.dir), local_dir(d)
  meta = _remote_metadata(fs, d.dir)
  os.makedirs(target, exist_ok=True)
  for split in SPLITS:
    info = meta["splits"][split]
    remote, local = f"{d.dir.rstrip('/')}/{info['file']}", os.path.join(target, info["file"])
    try:
      size = fs.size(remote)
      if _is_staged(local, size, info["sha256"]):
        continue
      log(f"staging {remote} ({size / 2**20:,.1f} MB) to {local}")
      _fetch(fs, remote, local, size, info["sha256"])
    except _remote_errors() as error:
      raise CorpusError(f"config.data.dir={d.dir!r}: copying {info['file']} failed: "
                        f"{errors.one_line(error, 200)}") from None
  with open(os.path.join(target, METADATA + ".partial"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  os.replace(os.path.join(target, METADATA + ".partial"), os.path.join(target, METADATA))
  return target
