"""Object stores (gs://, s3://, any fsspec URL) as staging and run directories reach them.

Each SDK reads its own settings from the environment: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` for S3; `GOOGLE_APPLICATION_CREDENTIALS` (or the VM's
service account) and `STORAGE_EMULATOR_HOST` for GCS; `FSSPEC_<PROTOCOL>_<OPTION>` for anything
else fsspec takes (e.g. FSSPEC_GCS_TOKEN=anon). Errors are raised as `errors.InputError`
subclasses the caller chooses, naming the setting (`name`, e.g. "--workdir") and the URL.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid

from slw_jax import errors

PACKAGES = {"s3": "s3fs==2026.9.0", "gs": "gcsfs==2026.10.1", "gcs": "gcsfs==2026.10.1"}


@functools.cache
def remote_errors() -> tuple:
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
  try:
    from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top  (401, 5xx)
    found.append(HttpError)
  except ImportError:
    pass
  return tuple(found)


def filesystem(url: str, name: str, error=errors.UsageError):
  """The fsspec filesystem of `url` (not cached: settings read from the environment now)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  scheme, _, rest = url.partition("://")
  if not rest.split("/", 1)[0]:
    raise error(f"{name}={url!r} names no bucket: write {scheme}://BUCKET/PATH")
  try:
    # No listings cache: a run's own listing must see what it (or another tool) wrote since.
    fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, use_listings_cache=False)
  except ImportError:
    package = PACKAGES.get(scheme, f"the fsspec backend of {scheme}://")
    raise error(f"{name}={url!r} needs {package}, which is not installed: "
                f"pip install {package}") from None
  except ValueError as error_:  # An unknown protocol.
    raise error(f"{name}={url!r} is not a URL fsspec can read: "
                f"{errors.one_line(error_, 200)}") from None
  except remote_errors() as error_:  # E.g. a credentials file that is missing or garbage.
    raise error(f"{name}={url!r} cannot be reached with these credentials: "
                f"{errors.one_line(error_, 200)}") from None
  return fs


def cache_name(url: str) -> str:
  """A local directory name for `url`: readable, and unique (a/b and a_b differ)."""
  scheme, rest = url.split("://", 1)
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{scheme}_{rest.strip('/')}")[:80]
  return f"{slug}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}"


def bucket_name(url: str) -> str:
  return url.partition("://")[2].split("/", 1)[0]


def check_bucket(fs, url: str, name: str, writable: bool, error=errors.UsageError):
  """One line (`error`) unless the bucket of `url` exists and answers; with `writable`, unless
  an object can be written there too (a probe object, deleted at once)."""
  bucket = bucket_name(url)
  try:
    try:
      fs.info(f"{url.partition('://')[0]}://{bucket}")  # Raises what exists() would hide.
    except FileNotFoundError:
      raise error(f"{name}={url!r}: the bucket {bucket!r} does not exist (or these "
                  "credentials cannot see it)") from None
    if writable:
      probe = f"{url.rstrip('/')}/.slw_write_probe-{uuid.uuid4().hex}"
      fs.pipe_file(probe, b"")
      fs.rm_file(probe)
  except remote_errors() as failure:
    verb = "written" if writable else "read"
    raise error(f"{name}={url!r} cannot be {verb}: {errors.one_line(failure, 200)}") from None
