"""Documents -> token bytes in worker processes, in order, in bounded memory (for prepare).

`encode_batches` takes batches of documents tagged with where they go (the split) and yields,
in the order given, each batch's token bytes: every document's ids followed by the
end-of-document id. Workers are spawned processes (a ProcessPoolExecutor: a worker that dies is an error, not a
hang), never forked: the parent may hold threads
(JAX's, TensorFlow's) that a fork would copy in an unknown state. Each builds its tokenizer
once. At most IN_FLIGHT batches per worker are outstanding, so memory is set by the batch size
(`batch_chars`), never by the corpus. `workers=1` encodes in this process with the same code,
so the output does not depend on the worker count; so does the byte vocabulary, which
encodes faster than a worker could be sent its text.
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import dataclasses
import json
import multiprocessing
import os
from typing import Iterable, Iterator, Union

from slw_jax import tokenizers_lib
from slw_jax.input_pipeline import CorpusError

IN_FLIGHT = 4  # Batches queued per worker: results are taken in order, so a slow batch
# (one huge document) must not leave the other workers idle.
# Bytes of memory per character of a batch in flight: the text in the parent and in the worker
# (up to 4 bytes a character each), the encoder's Python list of ids (~40 bytes a token, a token
# every ~4 characters for BPE) and the returned token bytes.
BYTES_PER_CHAR = 24
MIN_BATCH_CHARS = 1 << 16
# Smaller batches than memory allows keep every worker busy (a corpus of a few batches would
# leave workers idle); a 1M-character batch is about a second of BPE encoding.
MAX_BATCH_CHARS = 1 << 20

# Byte ids cost less to compute (a numpy view of the UTF-8 bytes, ~150 MB/s) than to send to a
# worker and back: with workers, preparation ran at half the speed (benchmarks/RESULTS.md).
IN_PROCESS_VOCABS = ("byte",)

_tokenizer = None  # A worker's tokenizer, built once by _start_worker.


@dataclasses.dataclass(frozen=True)
class JsonLine:
  """One undecoded line of a .jsonl file: the worker decodes it, since JSON parsing was the
  main process's largest cost and held the workers back (benchmarks/RESULTS.md)."""
  path: str
  number: int
  raw: bytes
  text_key: str

  def __len__(self) -> int:  # Batches are sized by it.
    return len(self.raw)

  def text(self) -> str:
    try:
      record = json.loads(self.raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
      raise CorpusError(f"{self.path}:{self.number} is not valid JSON ({reason})") from None
    if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str):
      raise CorpusError(f"{self.path}:{self.number} has no string field "
                        f"data.text_key={self.text_key!r}")
    return record[self.text_key]


Document = Union[str, JsonLine]


def jsonl_documents(path: str, name: str, text_key: str, on_read
                    ) -> Iterator[tuple[str, JsonLine]]:
  """(name:LINE, undecoded line) of every non-blank line of a .jsonl file: the tokenizer
  workers decode them. `on_read(nbytes)` is told the bytes read (progress)."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      on_read(len(raw))
      if raw.strip():
        yield f"{name}:{number}", JsonLine(path, number, raw, text_key)


def document_text(document: Document) -> str:
  return document if isinstance(document, str) else document.text()


def batch_chars(memory_mb: int, workers: int) -> int:
  """Characters of text per batch so that the batches in flight take about `memory_mb`."""
  budget = memory_mb * 2**20 // (IN_FLIGHT * workers * BYTES_PER_CHAR)
  return max(MIN_BATCH_CHARS, min(MAX_BATCH_CHARS, budget))


def batches(tagged_texts: Iterable[tuple[str, Document]], max_chars: int
            ) -> Iterator[tuple[str, list[Document]]]:
  """(tag, documents) batches of about `max_chars` characters (bytes for JsonLine), one tag per
  batch, each tag's documents in their order. A document longer than `max_chars` makes a batch
  of its own."""
  pending: dict[str, list[Document]] = {}
  sizes: dict[str, int] = collections.defaultdict(int)
  for tag, text in tagged_texts:
    pending.setdefault(tag, []).append(text)
    sizes[tag] += len(text)
    if sizes[tag] >= max_chars:
      yield tag, pending.pop(tag)
      sizes[tag] = 0
  for tag, texts in pending.items():
    yield tag, texts


def _quiet_tokenizers():
  # One core per worker: the tokenizers package would otherwise start a thread per core in
  # every worker (and workers=1 would not be one core).
  os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _start_worker(vocab: str):
  global _tokenizer
  _quiet_tokenizers()
  _tokenizer = tokenizers_lib.make_tokenizer(vocab)


def _encode(documents: list[Document], dtype: str) -> tuple[int, bytes, int]:
  """(non-empty documents, their token bytes, token count): empty texts are not documents."""
  texts = [text for text in map(document_text, documents) if text]
  return (len(texts), *_tokenizer.encode_documents(texts, dtype))


def encode_batches(tagged_batches: Iterable[tuple[str, list[Document]]], vocab: str,
                   dtype: str, workers: int) -> Iterator[tuple[str, int, bytes, int]]:
  """(tag, documents, token bytes, token count) per batch, in the batches' order. Batches are
  read from `tagged_batches` only as results are taken: a stream, never the whole corpus. A
  worker's CorpusError (a malformed line) is raised here."""
  if workers == 1 or vocab in IN_PROCESS_VOCABS:
    _start_worker(vocab)
    for tag, documents in tagged_batches:
      yield (tag, *_encode(documents, dtype))
    return
  context = multiprocessing.get_context("spawn")
  pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_start_worker, initargs=(vocab,))
  try:
    pending = collections.deque()
    for tag, documents in tagged_batches:
      pending.append((tag, pool.submit(_encode, documents, dtype)))
      del documents  # Only the worker's copy remains while it is in flight.
      if len(pending) >= IN_FLIGHT * workers:
        yield _result(*pending.popleft())
    while pending:
      yield _result(*pending.popleft())
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _result(tag: str, future) -> tuple[str, int, bytes, int]:
  try:
    return (tag, *future.result())
  except concurrent.futures.process.BrokenProcessPool:
    raise CorpusError("a tokenizer worker process died (out of memory? lower --memory_mb or "
                      "--workers)") from None
