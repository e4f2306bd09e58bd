"""Training-path data loading: numpy memmaps of prepared token files (no TensorFlow here).

A prepared split is one flat token file (documents joined by the end-of-document token). It is
indexed into windows of `seqlen_end + 1` tokens at offsets `i * seqlen_end`, shuffled by a seeded
permutation that is new every epoch. The loader's whole state is one integer, `position`:

- `truncate` mode (the paper): position counts windows. Step t takes the next `batch_size`
  windows and keeps inputs `[:, :L_t]` and targets `[:, 1:L_t + 1]`.
- `reshape` mode: position counts tokens of the epoch stream (the shuffled windows laid end to
  end, each contributing its first `seqlen_end` tokens as inputs and the true next tokens as
  targets). Step t cuts the next `batch_size * L_t` stream tokens into `batch_size` rows of
  `L_t`, so no token is thrown away and each step holds exactly the tokens truncation would.

The global batch at any position is a pure function of (seed, position): the same on every
host, every restart and every process count. Each process gathers only its own contiguous block
of rows (for `jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
from typing import Iterator

import numpy as np

METADATA = "metadata.json"
SPLITS = ("train", "validation")


class CorpusError(ValueError):
  """Prepared data that is missing, damaged or unusable with this config (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Batch:
  """One process's rows of a step: int32 token ids."""
  inputs: np.ndarray  # [rows, L]
  targets: np.ndarray  # [rows, L]


def read_metadata(data_dir: str) -> dict:
  """The metadata of a prepared data directory, or CorpusError when there is none."""
  path = os.path.join(data_dir, METADATA)
  if not os.path.isfile(path):
    raise CorpusError(f"data.dir={data_dir!r} holds no prepared data ({METADATA} missing): run "
                      "python -m slw_jax.prepare --config=<your config>")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise CorpusError(f"{path} is unreadable ({error}): prepare the data again") from None


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def open_split(data_dir: str, split: str, verify_max_bytes: int = 2**31) -> np.ndarray:
  """Memory-maps one split's token file after checking it against the metadata.

  The size is always checked; the sha256 when the file is at most `verify_max_bytes`.
  """
  meta = read_metadata(data_dir)
  info = meta.get("splits", {}).get(split)
  if info is None:
    raise CorpusError(f"{data_dir}/{METADATA} lists no {split!r} split: prepare the data again")
  path = os.path.join(data_dir, info["file"])
  dtype = np.dtype(meta["dtype"])
  if not os.path.isfile(path):
    raise CorpusError(f"token file {path} is missing: prepare the data again")
  size, expected = os.path.getsize(path), info["tokens"] * dtype.itemsize
  if size != expected:
    raise CorpusError(f"token file {path} has {size} bytes but {METADATA} says {info['tokens']} "
                      f"{dtype.name} tokens ({expected} bytes): prepare the data again")
  if info["tokens"] == 0:
    raise CorpusError(f"token file {path} is empty: the {split!r} split has no text")
  if size <= verify_max_bytes and file_sha256(path) != info["sha256"]:
    raise CorpusError(f"token file {path} does not match the sha256 in {METADATA}: it changed "
                      "after preparation; prepare the data again")
  return np.memmap(path, dtype=dtype, mode="r")


def check_vocab(meta: dict, model_vocab_size: int, data_dir: str):
  if meta["vocab_size"] > model_vocab_size:
    raise CorpusError(f"config.model.vocab_size={model_vocab_size} is too small for the data in "
                      f"{data_dir}: its vocabulary ({meta['vocab']}) has {meta['vocab_size']} ids")


def local_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """The global row numbers this process holds: one contiguous block per process."""
  if batch_size % process_count:
    raise CorpusError(f"batch size {batch_size} is not divisible by the process count "
                      f"{process_count}: every process must get the same number of rows")
  per_process = batch_size // process_count
  return np.arange(process_index * per_process, (process_index + 1) * per_process)


class WindowIndex:
  """Shuffled windows of `seqlen_end + 1` tokens over one token array; new order every epoch."""

  def __init__(self, tokens: np.ndarray, seqlen_end: int, seed: int, split: str = "train"):
    self.tokens, self.seqlen_end, self.seed = tokens, seqlen_end, seed
    self.num_windows = (len(tokens) - 1) // seqlen_end
    if self.num_windows < 1:
      raise CorpusError(f"the {split!r} split has {len(tokens)} tokens: too few for one window "
                        f"of pacing.seqlen_end + 1 = {seqlen_end + 1} tokens")
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._permutations:
        rng = np.random.default_rng([self.seed, epoch])
        self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
        self._permutations[epoch] = rng.permutation(self.num_windows)
      return self._permutations[epoch]

  def window_starts(self, windows: np.ndarray) -> np.ndarray:
    """Token offset of each global window index (epochs laid end to end)."""
    epochs, slots = np.divmod(windows, self.num_windows)
    starts = np.empty_like(windows)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      starts[here] = self._permutation(int(epoch))[slots[here]]
    return starts * self.seqlen_end

  def gather(self, input_index: np.ndarray) -> Batch:
    """Inputs at token offsets `input_index` and their next tokens as targets."""
    inputs = np.asarray(self.tokens[input_index], dtype=np.int32)
    targets = np.asarray(self.tokens[input_index + 1], dtype=np.int32)
    return Batch(inputs, targets)


def loader_state(position: int, mode: str, seed: int, seqlen_end: int, epoch: int) -> dict:
  """The JSON record of a loader's position (`Loader.state`); `loader_state(0, c.data.mode,
  c.seed, c.pacing.seqlen_end, 0)` is a run's start, before any data is opened."""
  return {"position": int(position), "mode": mode, "seed": int(seed),
          "seqlen_end": int(seqlen_end), "epoch": int(epoch)}


class Loader:
  """Global batches by position; this process materializes only its own rows."""

  def __init__(self, index: WindowIndex, mode: str = "truncate", process_index: int = 0,
               process_count: int = 1, position: int = 0):
    self.index, self.mode = index, mode
    self.process_index, self.process_count = process_index, process_count
    self.position = position

  def check_batch_fits(self, batch_size: int):
    if self.index.num_windows < batch_size:
      raise CorpusError(f"the corpus has {self.index.num_windows} windows of "
                        f"{self.index.seqlen_end + 1} tokens: smaller than one global batch of "
                        f"{batch_size}; use more data or a smaller batch_size")

  def advance(self, batch_size: int, seqlen: int) -> int:
    """How far one step of this shape moves the position."""
    return batch_size if self.mode == "truncate" else batch_size * seqlen

  def batch_at(self, position: int, batch_size: int, seqlen: int) -> Batch:
    """This process's rows of the global batch that starts at `position` (pure)."""
    rows = local_rows(batch_size, self.process_index, self.process_count)
    if self.mode == "truncate":
      starts = self.index.window_starts(position + rows)
      return self.index.gather(starts[:, None] + np.arange(seqlen)[None, :])
    stream = position + rows[:, None] * seqlen + np.arange(seqlen)[None, :]  # [rows, L]
    windows, offsets = np.divmod(stream, self.index.seqlen_end)
    return self.index.gather(self.index.window_starts(windows) + offsets)

  def next_batch(self, batch_size: int, seqlen: int) -> Batch:
    batch = self.batch_at(self.position, batch_size, seqlen)
    self.position += self.advance(batch_size, seqlen)
    return batch

  def state(self) -> dict:
    """Everything needed to continue exactly: saved in every checkpoint."""
    return loader_state(self.position, self.mode, self.index.seed, self.index.seqlen_end,
                        self._windows_used() // self.index.num_windows)

  def _windows_used(self) -> int:
    if self.mode == "truncate":
      return self.position
    return self.position // self.index.seqlen_end

  def restore(self, state: dict):
    """Continues from `state()`; refuses a state saved under a different data order."""
    for key in ("mode", "seed", "seqlen_end"):
      mine = self.state()[key]
      if state.get(key) != mine:
        raise CorpusError(f"checkpointed loader {key}={state.get(key)!r} differs from this run's "
                          f"{mine!r}: resuming would change the data order")
    self.position = int(state["position"])

  def prefetch(self, shapes: Iterator[tuple[int, int]], depth: int) -> Iterator[Batch]:
    """Yields the batches of the (batch_size, seqlen) `shapes` in order, `depth` ahead.

    `self.position` advances as each batch is handed out, so `state()` always describes the
    batches consumed so far, never the ones still waiting in the queue.
    """
    if depth <= 0:
      for batch_size, seqlen in shapes:
        yield self.next_batch(batch_size, seqlen)
      return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
      """Waits for room unless the consumer has gone; False when it has."""
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    def produce():
      position = self.position
      try:
        for batch_size, seqlen in shapes:
          item = (self.batch_at(position, batch_size, seqlen), batch_size, seqlen)
          position += self.advance(batch_size, seqlen)
          if not put(item):
            return
      except BaseException as error:  # Re-raised in the consumer.
        put(error)
        return
      put(None)

    worker = threading.Thread(target=produce, name="slw-prefetch", daemon=True)
    worker.start()
    try:
      while (item := ready.get()) is not None:
        if isinstance(item, BaseException):
          raise item
        batch, batch_size, seqlen = item
        self.position += self.advance(batch_size, seqlen)
        yield batch
    finally:
      stop.set()
      worker.join(timeout=5)


def validation_batch(index: WindowIndex, number: int, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Batch:
  """Validation batch `number`: full-length windows in file order (wrapping around)."""
  rows = local_rows(batch_size, process_index, process_count)
  windows = (number * batch_size + rows) % index.num_windows
  starts = windows * index.seqlen_end
  return index.gather(starts[:, None] + np.arange(index.seqlen_end)[None, :])


def ensure_prepared(c, log=print) -> dict:
  """Metadata of `c.data.dir`, preparing it first (seqio; needs TensorFlow) when missing."""
  if not os.path.isfile(os.path.join(c.data.dir, METADATA)):
    log(f"{c.data.dir} is not prepared yet: preparing it now")
    try:
      from slw_jax import prepare  # pylint: disable=g-import-not-at-top
    except ImportError as error:
      raise CorpusError(f"data.dir={c.data.dir!r} is not prepared and preparing needs the data "
                        f"packages of requirements.txt ({error}): run python -m slw_jax.prepare "
                        "where they are installed and copy the directory here") from None
    prepare.prepare(c, log=log)
  return read_metadata(c.data.dir)


def check_prepared_here(data_dir: str, process_index: int):
  """After process 0 prepared `data_dir`: every other process must see it too."""
  if not os.path.isfile(os.path.join(data_dir, METADATA)):
    raise CorpusError(f"data.dir={data_dir!r} is not prepared as process {process_index} sees "
                      "it (process 0 prepared it): put it on storage every process shares, or "
                      "prepare it on every host")


def open_training_data(c, process_index: int = 0, process_count: int = 1,
                       log=print) -> tuple[Loader, WindowIndex]:
  """The train loader and validation windows of a validated config, checked before training."""
  meta = ensure_prepared(c, log=log)
  check_vocab(meta, c.model.vocab_size, c.data.dir)
  seqlen_end = c.pacing.seqlen_end
  train = WindowIndex(open_split(c.data.dir, "train", c.data.verify_max_bytes), seqlen_end,
                      c.seed, "train")
  validation = WindowIndex(open_split(c.data.dir, "validation", c.data.verify_max_bytes),
                           seqlen_end, c.seed, "validation")
  loader = Loader(train, c.data.mode, process_index, process_count)
  loader.check_batch_fits(c.batch_size)
  local_rows(c.batch_size, process_index, process_count)  # Raises when rows do not divide.
  return loader, validation
