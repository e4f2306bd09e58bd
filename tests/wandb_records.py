"""Reads the records of an offline W&B run file (`run-<id>.wandb`), for the logging tests.

wandb 0.31 ships no Python reader (its core is a Go binary), so this parses the file's
LevelDB-log framing itself: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each a 7-byte header (crc32, length, type: full, first, middle, last) and
data; a block's tail shorter than a header is zero padding. Each reassembled record is a
`wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> list:
  with open(path, "rb") as f:
    data = f.read()
  ident, magic, version = struct.unpack("<4sHB", data[:7])
  assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
  out, pending, offset = [], b"", 7
  while offset + HEADER.size <= len(data):
    room = BLOCK - offset % BLOCK
    if room < HEADER.size:
      offset += room  # Zero padding at the end of a block.
      continue
    _, length, kind = HEADER.unpack_from(data, offset)
    chunk = data[offset + HEADER.size:offset + HEADER.size + length]
    offset += HEADER.size + length
    if kind == 0 and length == 0:
      continue
    pending = chunk if kind in (FULL, FIRST) else pending + chunk
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


class OfflineRun:
  """What one offline run file holds: its id, config, history rows, summary, files and exit
  code (None: the run was never finished)."""

  def __init__(self, path: str):
    self.path = path
    self.id, self.config, self.history, self.summary, self.files = None, {}, [], {}, []
    self.exit_code = None
    for record in records(path):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        self.id = record.run.run_id
        self.config.update(_items(record.run.config.update))
      elif kind == "config":
        self.config.update(_items(record.config.update))
      elif kind == "history":
        self.history.append(_items(record.history.item))
      elif kind == "summary":
        self.summary.update(_items(record.summary.update))
      elif kind == "files":
        self.files += [f.path for f in record.files.files]
      elif kind == "exit":
        self.exit_code = record.exit.exit_code


def _items(items) -> dict:
  return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def offline_runs(workdir: str) -> list[OfflineRun]:
  """Every offline run under `workdir`/wandb, oldest first."""
  paths = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")))
  return [OfflineRun(p) for p in paths]
