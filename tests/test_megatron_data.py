"""Megatron-LM indexed data (.bin + .idx) read as is, against files written by megatron-core's
own IndexedDatasetBuilder (megatron-core, a test-only dependency)."""

import numpy as np
import pytest

from slw_jax import config_lib, megatron_data
from slw_jax import input_pipeline as ip


def _documents(count, vocab_size, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, rng.integers(20, 200)) for _ in range(count)]


def _write_with_megatron(prefix, documents, vocab_size):
  """The files `tools/preprocess_data.py` writes: its dtype choice by vocabulary size."""
  from megatron.core.datasets import indexed_dataset  # pylint: disable=g-import-not-at-top
  dtype = indexed_dataset.DType.optimal_dtype(vocab_size)
  builder = indexed_dataset.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
  for document in documents:
    builder.add_document(np.asarray(document), [len(document)])
  builder.finalize(f"{prefix}.idx")
  return dtype, indexed_dataset.IndexedDataset(str(prefix))


@pytest.mark.parametrize("vocab_size,dtype", [(50257, np.uint16), (100_000, np.int32)])
def test_reads_megatron_cores_files_in_both_dtypes(tmp_path, vocab_size, dtype):
  documents = _documents(30, vocab_size)
  written, reference = _write_with_megatron(tmp_path / "corpus", documents, vocab_size)
  assert written == dtype
  index = megatron_data.read_index(str(tmp_path / "corpus"))
  assert index.dtype == np.dtype(dtype) and index.num_documents == 30
  np.testing.assert_array_equal(index.sequence_lengths, reference.index.sequence_lengths)
  np.testing.assert_array_equal(index.sequence_pointers, reference.index.sequence_pointers)
  np.testing.assert_array_equal(index.document_indices, reference.index.document_indices)
  splits = megatron_data.open_splits(str(tmp_path / "corpus"), val_fraction=0.1)
  held_out = np.concatenate(documents[-3:])  # The last 10% of the documents.
  np.testing.assert_array_equal(splits["validation"], held_out)
  np.testing.assert_array_equal(splits["train"], np.concatenate(documents[:-3]))
  np.testing.assert_array_equal(splits["train"][:len(documents[0])], reference[0])


@pytest.mark.slow
def test_trains_on_a_megatron_pair_without_preparing(tmp_path, make_config):
  """data.source=megatron:PREFIX: the loader's windows are the .bin's own token stream, and a
  run trains on it with no data.dir prepared."""
  from slw_jax import trainer  # pylint: disable=g-import-not-at-top
  documents = _documents(60, 259, seed=1)
  _write_with_megatron(tmp_path / "mega", documents, 259)
  c = make_config(data__source=f"megatron:{tmp_path / 'mega'}", data__vocab="byte",
                  data__dir=str(tmp_path / "never"), train_steps=3, eval__every_steps=3)
  loader, validation = ip.open_training_data(c, log=lambda *_: None)
  held_out = max(1, round(60 * c.data.val_fraction))
  train = np.concatenate(documents[:60 - held_out])
  starts = np.arange(0, len(train) - c.pacing.seqlen_end, c.pacing.seqlen_end)
  windows = {tuple(train[s:s + 9]) for s in starts}  # Window prefixes: inputs + next token.
  batch = loader.batch_at(0, 4, 8)
  for inputs, targets in zip(batch.inputs, batch.targets):
    assert tuple(np.append(inputs, targets[-1])) in windows
  assert validation.num_windows >= 1
  summary = trainer.Trainer(c, str(tmp_path / "run")).run()
  assert summary["completed"] and summary["steps"] == 3
  assert not (tmp_path / "never").exists()


def _damaged(tmp_path, edit):
  _write_with_megatron(tmp_path / "bad", _documents(5, 1000), 1000)
  edit(tmp_path / "bad")
  return str(tmp_path / "bad")


def _patch(path, offset, data):
  raw = bytearray(path.read_bytes())
  raw[offset:offset + len(data)] = data
  path.write_bytes(bytes(raw))


@pytest.mark.parametrize("edit,message", [
    (lambda p: _patch(p.with_suffix(".idx"), 0, b"TNTIDX\x00\x00"),
     r"bad.idx is not a Megatron index: it does not start with"),
    (lambda p: _patch(p.with_suffix(".idx"), 17, bytes([7])),
     r"bad.idx stores float32 values \(dtype code 7\): token ids must be integers"),
    (lambda p: _patch(p.with_suffix(".idx"), 17, bytes([9])),
     r"bad.idx has dtype code 9, which Megatron does not define"),
    (lambda p: _patch(p.with_suffix(".idx"), 18, (99).to_bytes(8, "little")),
     r"bad.idx has \d+ bytes but its header's 99 sequences"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:-2]),
     r"bad.bin has \d+ bytes but .*bad.idx describes \d+"),
    (lambda p: p.with_suffix(".bin").unlink(), r"bad.bin does not exist"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes() + bytes(5)),
     r"bad.idx is a multimodal dataset"),
    (lambda p: (p.with_suffix(".idx").write_bytes(
        megatron_data.MAGIC + (1).to_bytes(8, "little") + bytes([8]) + bytes(8) +
        (1).to_bytes(8, "little") + bytes(8)), p.with_suffix(".bin").write_bytes(b"")),
     r"bad.idx holds no sequences"),
    (lambda p: None, r"bad.bin holds token id \d+, outside the 259 ids of data.vocab='byte'"),
])
def test_damaged_pairs_are_one_line_errors_before_training(tmp_path, load_config, edit, message):
  prefix = _damaged(tmp_path, edit)
  c = config_lib.validate(load_config("tiny", data__source=f"megatron:{prefix}",
                                      pacing__multiple=8))
  with pytest.raises(ip.CorpusError, match=r"^config.data.source='megatron:.*': .*" + message):
    ip.open_training_data(c, log=lambda *_: None)
