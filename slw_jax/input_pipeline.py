"""Training-path data loading: numpy memmaps of prepared token files or of a Megatron `.bin`
(no TensorFlow here).

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
import subprocess
import sys
import tempfile
import threading
from typing import Iterator

import numpy as np

from slw_jax import data_spec, errors, staging
from slw_jax.data_spec import METADATA, SPLITS, CorpusError



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


VOCAB_ROUNDING = 128  # A model may define up to its data's vocabulary rounded up to this.


def check_vocab(meta: dict, model_vocab_size: int, data_dir: str):
  """The model must define every id of the data's vocabulary, and not many more: a model of
  another vocabulary (GPT-2's 50257 on byte data) would train on a corpus it was not meant for.
  It may define the data's size rounded up to VOCAB_ROUNDING (nanoGPT's 50304)."""
  ids = meta["vocab_size"]
  if ids > model_vocab_size:
    raise CorpusError(f"config.model.vocab_size={model_vocab_size} is too small for the data in "
                      f"{data_dir}: its vocabulary ({meta['vocab']}) has {ids} ids")
  largest = -(-ids // VOCAB_ROUNDING) * VOCAB_ROUNDING
  if model_vocab_size > largest:
    raise CorpusError(f"config.model.vocab_size={model_vocab_size} does not match the data in "
                      f"{data_dir}: its vocabulary ({meta['vocab']}) has {ids} ids (allowed: "
                      f"{ids} to {largest}); prepare data with the model's tokenizer, e.g. "
                      "--config.data.vocab=gpt2:PATH for GPT-2's 50257")


def local_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
  """The global row numbers this process holds: one contiguous block per process."""
  if batch_size % process_count:
    raise CorpusError(f"batch size {batch_size} is not divisible by the process count "
                      f"{process_count}: every process must get the same number of rows")
  per_process = batch_size // process_count
  return np.arange(process_index * per_process, (process_index + 1) * per_process)


# ----- the data order: a keyed permutation of windows per epoch ---------------------------------
# Each epoch visits every window once, in an order that is a pure function of (seed, epoch,
# slot) computed with our own integer arithmetic (so it is the same on every numpy version and
# host) in memory proportional to the batch, not the corpus. The permutation is a balanced
# Feistel network over the 2^(2h) >= n smallest even power of two, with SplitMix64's finalizer
# as round function, made a permutation of [0, n) by cycle walking (values >= n are permuted
# again until they land below n). Earlier releases drew numpy permutations: their data order
# differs from this one (DATA_ORDER names it in every checkpoint).

DATA_ORDER = "feistel-splitmix64-v1"
FEISTEL_ROUNDS = 6
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
  """SplitMix64's finalizer on a Python int (the round keys)."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
  """The same finalizer on uint64 arrays (numpy's uint64 multiply wraps modulo 2^64)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def keyed_permutation(slots: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """The window at each slot of epoch `epoch`: a bijection of [0, n) keyed by (seed, epoch)."""
  half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2^(2 * half) >= n.
  mask = np.uint64((1 << half) - 1)
  base = _splitmix64((seed & _MASK64) ^ _splitmix64(epoch & _MASK64))
  keys = [np.uint64(_splitmix64(base + r)) for r in range(FEISTEL_ROUNDS)]

  def feistel(x):
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
      left, right = right, left ^ (_splitmix64_array(right ^ key) & mask)
    return (left << np.uint64(half)) | right

  out = feistel(np.asarray(slots, np.uint64))
  outside = out >= n
  while outside.any():  # Cycle walking: each value's cycle returns into [0, n).
    out[outside] = feistel(out[outside])
    outside = out >= n
  return out.astype(np.int64)


class WindowIndex:
  """Windows of `seqlen_end + 1` tokens over one token array, in a new order every epoch."""

  def __init__(self, tokens: np.ndarray, seqlen_end: int, seed: int, split: str = "train"):
    self.tokens, self.seqlen_end, self.seed = tokens, seqlen_end, seed
    self.num_windows = (len(tokens) - 1) // seqlen_end
    if self.num_windows < 1:
      raise CorpusError(f"the {split!r} split has {len(tokens)} tokens: too few for one window "
                        f"of pacing.seqlen_end + 1 = {seqlen_end + 1} tokens")

  def window_starts(self, windows: np.ndarray) -> np.ndarray:
    """Token offset of each global window index (epochs laid end to end)."""
    epochs, slots = np.divmod(np.asarray(windows, np.int64), self.num_windows)
    starts = np.empty_like(slots)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      starts[here] = keyed_permutation(slots[here], self.num_windows, self.seed, int(epoch))
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
          "seqlen_end": int(seqlen_end), "epoch": int(epoch), "order": DATA_ORDER}


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

  def restore(self, state: dict) -> str | None:
    """Continues from `state()`; refuses a state saved under a different data order. A state
    from before DATA_ORDER (numpy permutations) continues at its position in this order: the
    returned note says so (the rest of that epoch may repeat or skip windows)."""
    for key in ("mode", "seed", "seqlen_end"):
      mine = self.state()[key]
      if state.get(key) != mine:
        raise CorpusError(f"checkpointed loader {key}={state.get(key)!r} differs from this run's "
                          f"{mine!r}: resuming would change the data order")
    order = state.get("order")
    if order is not None and order != DATA_ORDER:
      raise CorpusError(f"checkpointed loader order={order!r} is unknown to this release "
                        f"({DATA_ORDER!r}): resume with the release that wrote it")
    self.position = int(state["position"])
    if order is None:
      return (f"the checkpoint's data order is an earlier release's (numpy permutations): the "
              f"run continues at position {self.position:,} in this release's {DATA_ORDER} order")
    return None

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


def require_corpus(d):
  """CorpusError when the config names no corpus (the paper configs have none by default)."""
  missing = data_spec.corpus_missing(d)
  if missing:
    raise CorpusError(missing)


def prepared_dir(c, log=print) -> str:
  """The local directory holding `c.data.dir`'s prepared files: itself, prepared first when
  missing (in a child process), or for a URL its copy staged to local disk (slw_jax.staging:
  data on object storage is prepared already)."""
  if errors.is_url(c.data.dir):
    return staging.stage(c.data, log)
  if not os.path.isfile(os.path.join(c.data.dir, METADATA)):
    log(f"{c.data.dir} is not prepared yet: preparing it now")
    prepare_in_child(c.data, log)
  return c.data.dir


def ensure_prepared(c, log=print) -> dict:
  """Metadata of `c.data.dir` (`prepared_dir`: prepared or staged first when needed)."""
  return read_metadata(prepared_dir(c, log))


def prepare_in_child(data, log=print):
  """Runs `slw_jax.prepare` on the config's `data` section in a child process, which sees no
  GPU. Preparation may import TensorFlow (TFDS sources), which must never enter a process that
  trains: it would claim accelerator memory and threads. The child's lines are passed to `log`;
  its one-line error becomes a CorpusError here."""
  fd, path = tempfile.mkstemp(prefix="slw-data-", suffix=".json")
  with os.fdopen(fd, "w") as f:
    json.dump(data.to_dict(), f)
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
  # Unbuffered: the child's progress lines arrive as they are printed, not at its exit.
  env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu",
         "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
  lines = []
  try:
    with subprocess.Popen([sys.executable, "-m", "slw_jax.prepare", f"--data_json={path}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", env=env) as child:
      for line in child.stdout:
        lines.append(line.rstrip("\n"))
        if not lines[-1].startswith("error: "):
          log(lines[-1])
  finally:
    os.remove(path)
  if child.returncode:
    messages = [l[len("error: "):] for l in lines if l.startswith("error: ")]
    raise CorpusError(messages[-1] if messages else (
        f"preparing data.dir={data.dir!r} failed in its child process (exit status "
        f"{child.returncode}): {lines[-1] if lines else 'no output'}"))


def check_prepared_here(data_dir: str, process_index: int):
  """After process 0 prepared `data_dir`: every other process must see it too."""
  if not os.path.isfile(os.path.join(data_dir, METADATA)):
    raise CorpusError(f"data.dir={data_dir!r} is not prepared as process {process_index} sees "
                      "it (process 0 prepared it): put it on storage every process shares, or "
                      "prepare it on every host")


def is_megatron(d) -> bool:
  """Whether `data.source` is a Megatron .bin/.idx pair (read as is: nothing to prepare)."""
  return d.source is not None and d.source.startswith("megatron:")


def open_megatron(d) -> tuple[dict, dict[str, np.ndarray]]:
  """(vocabulary facts, {split: tokens}) of a `megatron:PREFIX` source."""
  from slw_jax import megatron_data, tokenizers_lib  # pylint: disable=g-import-not-at-top
  try:
    splits = megatron_data.open_splits(d.source.split(":", 1)[1], d.val_fraction)
    vocab_size = tokenizers_lib.make_tokenizer(d.vocab).vocab_size
    megatron_data.check_ids(splits, vocab_size, d.source.split(":", 1)[1], d.vocab)
  except errors.InputError as error:  # MegatronDataError, or the tokenizer's files.
    raise CorpusError(f"config.data.source={d.source!r}: {error}") from None
  return {"vocab": d.vocab, "vocab_size": vocab_size}, splits


def open_token_splits(c, log=print) -> tuple[dict, dict[str, np.ndarray]]:
  """(metadata, {split: token array}) of the config's data: a Megatron pair as is, or the
  prepared `data.dir` (prepared first, in a child process, when missing)."""
  require_corpus(c.data)
  if is_megatron(c.data):
    return open_megatron(c.data)
  local = prepared_dir(c, log=log)
  return read_metadata(local), {s: open_split(local, s, c.data.verify_max_bytes) for s in SPLITS}


def open_run_data(c, process_rows: tuple[int, int], log) -> tuple[Loader, WindowIndex]:
  """`open_training_data` for this process's block of batch rows (`process_rows`: index,
  count). With several processes, process 0 prepares missing data while the others wait for
  it (a Megatron pair is read as is)."""
  import jax  # pylint: disable=g-import-not-at-top  (JAX: only to train, not to prepare)
  from slw_jax import distributed  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1 and not is_megatron(c.data) and not errors.is_url(c.data.dir):
    require_corpus(c.data)
    distributed.first_process_does(lambda: ensure_prepared(c, log=log),
                                   f"preparing data.dir={c.data.dir!r}")
    check_prepared_here(c.data.dir, jax.process_index())
  return open_training_data(c, *process_rows, log=log)


def open_training_data(c, process_index: int = 0, process_count: int = 1,
                       log=print) -> tuple[Loader, WindowIndex]:
  """The train loader and validation windows of a validated config, checked before training."""
  meta, tokens = open_token_splits(c, log)
  check_vocab(meta, c.model.vocab_size, c.data.source if is_megatron(c.data) else c.data.dir)
  seqlen_end = c.pacing.seqlen_end
  train = WindowIndex(tokens["train"], seqlen_end, c.seed, "train")
  validation = WindowIndex(tokens["validation"], seqlen_end, c.seed, "validation")
  loader = Loader(train, c.data.mode, process_index, process_count)
  loader.check_batch_fits(c.batch_size)
  local_rows(c.batch_size, process_index, process_count)  # Raises when rows do not divide.
  return loader, validation
