"""Megatron-LM / Megatron-DeepSpeed indexed data (`PREFIX.bin` + `PREFIX.idx`), read as is.

`data.source=megatron:PREFIX` trains on the token ids Megatron's `preprocess_data.py` wrote,
without tokenizing again. The `.bin` holds every sequence's ids back to back (no header); the
`.idx` describes them (little-endian, megatron-core's `IndexedDatasetBuilder` and
Megatron-DeepSpeed's `MMapIndexedDataset` write the same layout):

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    uint64 version = 1
    uint8  dtype code      (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32,
                            8 uint16; preprocess_data picks uint16 below 65,500 ids, else int32)
    uint64 S               sequences
    uint64 D               document boundaries (documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence pointers (byte offsets into .bin)
    int64[D]  document indices (document d is sequences [idx[d], idx[d+1]))
    [int8[S]  sequence modes, multimodal datasets only]

The sequences are contiguous in `.bin`, so the file is one token stream, which the loader cuts
into windows like a prepared split. Validation is the last `data.val_fraction` of the
documents (a contiguous tail, as Megatron's own "train,valid,test" splits are), train the rest.
Documents keep whatever separator Megatron wrote (`--append-eod`: the end-of-document id).
Before training: the index is checked against itself and the `.bin`'s size (memory-mapped, in
chunks), and a spread sample of ids against `data.vocab`'s size; multimodal datasets (sequence
modes) and float dtypes are refused.
"""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from slw_jax import errors

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34  # magic, version, dtype code, S, D.
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = {6: "float64", 7: "float32"}


class MegatronDataError(errors.InputError):
  """A `.bin`/`.idx` pair that cannot be read (one line naming the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class MegatronIndex:
  dtype: np.dtype
  sequence_lengths: np.ndarray  # int32 [S]
  sequence_pointers: np.ndarray  # int64 [S], bytes
  document_indices: np.ndarray  # int64 [D]

  @property
  def num_documents(self) -> int:
    return len(self.document_indices) - 1

  def document_token_offset(self, document: int) -> int:
    """Token offset in `.bin` where `document` starts (the stream's end for num_documents)."""
    sequence = int(self.document_indices[document])
    if sequence == len(self.sequence_lengths):
      return int(self.sequence_lengths.sum(dtype=np.int64))
    return int(self.sequence_pointers[sequence]) // self.dtype.itemsize


def _header(path: str, raw: bytes) -> tuple[np.dtype, int, int]:
  if len(raw) < HEADER_BYTES or raw[:9] != MAGIC:
    raise MegatronDataError(f"{path} is not a Megatron index: it does not start with "
                            f"{MAGIC!r} (the MMIDIDX format of megatron-core and "
                            "Megatron-DeepSpeed)")
  version, code, sequences, boundaries = struct.unpack("<QBQQ", raw[9:HEADER_BYTES])
  if version != 1:
    raise MegatronDataError(f"{path} has index version {version}: only version 1 is known")
  if code in FLOAT_CODES:
    raise MegatronDataError(f"{path} stores {FLOAT_CODES[code]} values (dtype code {code}): "
                            "token ids must be integers (codes 1-5 and 8)")
  if code not in TOKEN_DTYPES:
    raise MegatronDataError(f"{path} has dtype code {code}, which Megatron does not define "
                            "(known: 1-8)")
  return np.dtype(TOKEN_DTYPES[code]).newbyteorder("<"), sequences, boundaries


def read_index(prefix: str) -> MegatronIndex:
  """The `.idx` of `prefix` (memory-mapped: the Pile's is gigabytes), checked against itself
  and against the size of `.bin`."""
  idx_path, bin_path = prefix + ".idx", prefix + ".bin"
  for path in (idx_path, bin_path):
    if not os.path.isfile(path):
      raise MegatronDataError(f"{path} does not exist (a Megatron dataset is PREFIX.bin + "
                              "PREFIX.idx)")
  with open(idx_path, "rb") as f:
    dtype, sequences, boundaries = _header(idx_path, f.read(HEADER_BYTES))
  arrays, size = HEADER_BYTES + 12 * sequences + 8 * boundaries, os.path.getsize(idx_path)
  if size == arrays + sequences and sequences:
    raise MegatronDataError(f"{idx_path} is a multimodal dataset (it stores sequence modes): "
                            "only token datasets can be trained on")
  if size != arrays:
    raise MegatronDataError(f"{idx_path} has {size} bytes but its header's {sequences} "
                            f"sequences and {boundaries} document boundaries need {arrays}")
  if sequences == 0:
    raise MegatronDataError(f"{idx_path} holds no sequences: the dataset is empty")
  view = lambda dt, count, offset: np.memmap(idx_path, dt, "r", offset, (count,))  # noqa: E731
  index = MegatronIndex(dtype, view("<i4", sequences, HEADER_BYTES),
                        view("<i8", sequences, HEADER_BYTES + 4 * sequences),
                        view("<i8", boundaries, HEADER_BYTES + 12 * sequences))
  _check_consistent(index, idx_path, bin_path)
  return index


CHECK_CHUNK = 1 << 22  # Index entries checked at a time: bounded memory for any index size.


def _check_consistent(index: MegatronIndex, idx_path: str, bin_path: str):
  lengths, pointers, documents = (index.sequence_lengths, index.sequence_pointers,
                                  index.document_indices)
  if len(documents) < 2 or documents[0] != 0 or documents[-1] != len(lengths):
    raise MegatronDataError(f"{idx_path} has malformed document indices: they must rise from 0 "
                            f"to the sequence count {len(lengths)}")
  tokens = 0  # Tokens before the chunk: its first pointer must be there.
  for start in range(0, len(lengths), CHECK_CHUNK):
    chunk = np.asarray(lengths[start:start + CHECK_CHUNK], np.int64)
    if np.any(chunk < 0):
      raise MegatronDataError(f"{idx_path} has a negative sequence length")
    expected = (tokens + np.concatenate([[0], np.cumsum(chunk[:-1])])) * index.dtype.itemsize
    if not np.array_equal(pointers[start:start + CHECK_CHUNK], expected):
      raise MegatronDataError(f"{idx_path} has sequence pointers that do not follow its "
                              "lengths (sequences must lie back to back in the .bin)")
    tokens += int(chunk.sum())
  for start in range(0, len(documents) - 1, CHECK_CHUNK):
    if np.any(np.diff(documents[start:start + CHECK_CHUNK + 1]) < 0):
      raise MegatronDataError(f"{idx_path} has malformed document indices: they must rise from "
                              f"0 to the sequence count {len(lengths)}")
  need, have = tokens * index.dtype.itemsize, os.path.getsize(bin_path)
  if have != need:
    raise MegatronDataError(f"{bin_path} has {have} bytes but {idx_path} describes {need} "
                            f"({tokens} {index.dtype.name} tokens)")


ID_SAMPLE = 1 << 20  # Token ids checked per split, evenly spread (reading all would take long).


def check_ids(splits: dict[str, np.ndarray], vocab_size: int, prefix: str, vocab: str):
  """MegatronDataError when an id lies outside [0, vocab_size): data tokenized with another
  vocabulary than `data.vocab` (checked on a spread sample of each split)."""
  for tokens in splits.values():
    part = tokens[::max(1, len(tokens) // ID_SAMPLE)]
    low, high = int(part.min()), int(part.max())
    if low < 0 or high >= vocab_size:
      bad = high if high >= vocab_size else low
      raise MegatronDataError(f"{prefix}.bin holds token id {bad}, outside the {vocab_size} ids "
                              f"of data.vocab={vocab!r}: pass the tokenizer the data was made with")


def open_splits(prefix: str, val_fraction: float) -> dict[str, np.ndarray]:
  """{"train", "validation"}: memory-mapped token ranges of `.bin` (no copy); validation holds
  the last `val_fraction` of the documents (at least one), train the others (at least one)."""
  index = read_index(prefix)
  if index.num_documents < 2:
    raise MegatronDataError(f"{prefix}.idx holds {index.num_documents} document: at least 2 are "
                            "needed (train and validation)")
  held_out = min(max(1, round(index.num_documents * val_fraction)), index.num_documents - 1)
  cut = index.document_token_offset(index.num_documents - held_out)
  tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
  return {"train": tokens[:cut], "validation": tokens[cut:]}
