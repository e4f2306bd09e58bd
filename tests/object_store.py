"""Local object-storage servers for the tests: moto's S3 server and gcp-storage-emulator, each
started on 127.0.0.1 on a free port (no network), stopped at the end of the session. The tests
reach them only through each SDK's standard environment variables, as a user's run would."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

BUCKET = "slw-test-bucket"


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
  from moto.server import ThreadedMotoServer  # pylint: disable=g-import-not-at-top
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
         "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}
  server.stop()


@pytest.fixture(scope="session")
def gcs_server():
  from gcp_storage_emulator.server import create_server  # pylint: disable=g-import-not-at-top
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  # gcsfs's hierarchical-namespace probe speaks gRPC, which the emulator lacks (a 60 s stall).
  yield {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "FSSPEC_GCS_TOKEN": "anon",
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  server.stop()


@pytest.fixture(params=["s3", "gs"])
def bucket(request, monkeypatch):
  """'s3://BUCKET' or 'gs://BUCKET', empty, with its server's variables in the environment."""
  env = request.getfixturevalue("s3_server" if request.param == "s3" else "gcs_server")
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  import fsspec  # pylint: disable=g-import-not-at-top
  url = f"{request.param}://{BUCKET}"
  fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True)
  if not fs.exists(url):
    fs.mkdir(url)  # S3; the GCS emulator starts with the bucket (its default_bucket).
  for path in fs.find(url):  # Empty, whatever the test before left.
    fs.rm_file(path)
  return url


def upload(local_dir, url: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True)
  for name in sorted(os.listdir(local_dir)):
    fs.put_file(os.path.join(local_dir, name), f"{url}/{name}")
  return fs
