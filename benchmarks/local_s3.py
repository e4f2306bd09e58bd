"""A moto S3 server for the object-storage benchmarks, in its own process on 127.0.0.1 (a real
endpoint is another machine: it must not share the benchmark's GIL), with the environment
variables every S3 client here reads pointed at it."""

import contextlib
import os
import socket
import subprocess
import sys
import time


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@contextlib.contextmanager
def server():
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from moto.server import ThreadedMotoServer; "
       f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False).start(); "
       "time.sleep(10**6)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
  try:
    time.sleep(2)  # The server's start-up.
    yield
  finally:
    process.terminate()
    process.wait()
