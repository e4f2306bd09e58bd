"""Hugging Face datasets as a prepare source: hf:PATH (save_to_disk) and hf_files:GLOB."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slw_jax import config_lib, hf_source, prepare
from slw_jax import input_pipeline as ip
from tests.test_prepare import _decode_bytes, _documents_of, _local_gpt2_bpe

TRAIN = [f"train document {i}: " + "héllo " * (i % 7) + "z" * i for i in range(60)] + [""]
VALIDATION = [f"held-out document {i} ✓" for i in range(12)]
TEST = ["a test-split document, never prepared"]


def _config(load_config, tmp_path, source, **overrides):
  overrides.setdefault("data__dir", str(tmp_path / "prepared"))
  return config_lib.validate(load_config("tiny", data__source=source, pacing__multiple=8,
                                         **overrides))


def _prepared_texts(folder):
  return {s: _decode_bytes(np.fromfile(folder / f"{s}.bin", np.uint16)) for s in ip.SPLITS}


def _saved(tmp_path, splits: dict, name="saved"):
  import datasets  # pylint: disable=g-import-not-at-top
  dataset = datasets.DatasetDict({split: datasets.Dataset.from_dict(
      {"text": texts, "id": list(range(len(texts)))}) for split, texts in splits.items()})
  if list(splits) == ["plain"]:
    dataset = dataset["plain"]  # One Dataset, no splits.
  dataset.save_to_disk(str(tmp_path / name))
  return tmp_path / name


def test_a_saved_dataset_with_splits_is_prepared_document_for_document(load_config, tmp_path):
  path = _saved(tmp_path, {"train": TRAIN, "validation": VALIDATION, "test": TEST})
  meta = prepare.prepare(_config(load_config, tmp_path, f"hf:{path}"), log=lambda *_: None)
  texts = _prepared_texts(tmp_path / "prepared")
  assert texts == {"train": [t for t in TRAIN if t], "validation": VALIDATION}
  assert meta["splits"]["train"]["documents"] == len(TRAIN) - 1  # The empty one is dropped.
  assert meta["hf_train_split"] == "train" and meta["hf_val_split"] == "validation"


def test_other_split_names_and_a_held_out_fraction_without_validation(load_config, tmp_path):
  named = _saved(tmp_path, {"web": TRAIN, "dev": VALIDATION}, "named")
  c = _config(load_config, tmp_path, f"hf:{named}", data__hf_train_split="web",
              data__hf_val_split="dev")
  prepare.prepare(c, log=lambda *_: None)
  assert _prepared_texts(tmp_path / "prepared")["validation"] == VALIDATION
  plain = _saved(tmp_path, {"plain": TRAIN}, "plain")  # One Dataset: validation is held out.
  c = _config(load_config, tmp_path, f"hf:{plain}", data__val_fraction=0.2,
              data__dir=str(tmp_path / "held_out"))
  prepare.prepare(c, log=lambda *_: None)
  texts = _prepared_texts(tmp_path / "held_out")
  expected_val = [t for i, t in enumerate(TRAIN) if t and prepare.is_validation(f"train/{i}", 0.2)]
  assert texts["validation"] == expected_val and 0 < len(expected_val) < 30
  assert sorted(texts["train"] + texts["validation"]) == sorted(t for t in TRAIN if t)


def _write_shards(folder, with_validation=True):
  """The hub's layout: train-0000N-of-00002.parquet, an arrow validation shard, a jsonl
  shard of train, and a test shard that is never read."""
  folder.mkdir(parents=True)
  half = len(TRAIN) // 2
  pq.write_table(pa.table({"text": TRAIN[:half]}), folder / "train-00000-of-00002.parquet",
                 row_group_size=7)
  pq.write_table(pa.table({"text": TRAIN[half:]}), folder / "train-00001-of-00002.parquet")
  with open(folder / "train-extra.jsonl", "w") as f:
    f.writelines(json.dumps({"text": t}) + "\n" for t in VALIDATION[:2])
  if with_validation:
    table = pa.table({"text": VALIDATION})
    with pa.OSFile(str(folder / "validation-00000-of-00001.arrow"), "wb") as sink:
      with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
  pq.write_table(pa.table({"text": TEST}), folder / "test-00000-of-00001.parquet")


def test_hf_files_read_parquet_arrow_and_jsonl_shards_by_split(load_config, tmp_path):
  _write_shards(tmp_path / "shards")
  c = _config(load_config, tmp_path, f"hf_files:{tmp_path}/shards/*")
  prepare.prepare(c, log=lambda *_: None)
  texts = _prepared_texts(tmp_path / "prepared")
  assert texts == {"train": [t for t in TRAIN if t] + VALIDATION[:2], "validation": VALIDATION}


def test_hf_files_without_a_validation_shard_hold_documents_out(load_config, tmp_path):
  _write_shards(tmp_path / "shards", with_validation=False)
  c = _config(load_config, tmp_path, f"hf_files:{tmp_path}/shards/*.parquet",
              data__val_fraction=0.25)
  prepare.prepare(c, log=lambda *_: None)
  texts = _prepared_texts(tmp_path / "prepared")
  assert texts["validation"] and sorted(texts["train"] + texts["validation"]) == sorted(
      t for t in TRAIN if t)


def test_any_worker_count_writes_the_same_bytes_from_a_saved_dataset(load_config, tmp_path):
  path = _saved(tmp_path, {"train": TRAIN, "validation": VALIDATION})
  bpe = _local_gpt2_bpe(tmp_path / "bpe", TRAIN + VALIDATION, vocab_size=300)
  eos = bpe.token_to_id("<|endoftext|>")
  prepared = {}
  for workers in (1, 3):
    folder = tmp_path / f"w{workers}"
    c = _config(load_config, tmp_path, f"hf:{path}", data__dir=str(folder),
                data__vocab=f"gpt2:{tmp_path / 'bpe' / 'tokenizer.json'}")
    prepare.prepare(c, log=lambda *_: None, workers=workers, memory_mb=prepare.MIN_MEMORY_MB)
    prepared[workers] = {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}
  assert prepared[1] == prepared[3]
  assert _documents_of(tmp_path / "w3" / "validation.bin", np.uint16, eos) == [
      bpe.encode(t, add_special_tokens=False).ids for t in VALIDATION]


def test_documents_are_read_in_bounded_batches(load_config, tmp_path, monkeypatch):
  """The reader never holds more than BATCH_ROWS documents of a split at once."""
  path = _saved(tmp_path, {"train": TRAIN, "validation": VALIDATION})
  monkeypatch.setattr(hf_source, "BATCH_ROWS", 8)
  read = []
  c = _config(load_config, tmp_path, f"hf:{path}")
  documents = hf_source.tagged_documents(c.data, prepare.is_validation, read.append)
  first = next(documents)
  assert first == ("train", TRAIN[0]) and len(read) == 1 and read[0] < 8 * 200
  assert len(list(documents)) == len(TRAIN) + len(VALIDATION) - 2
  assert len(read) == 8 + 2  # 61 train rows in batches of 8, then 12 validation rows.


@pytest.mark.parametrize("case", ["hub name", "not saved", "no text key", "text key not text",
                                  "no such split", "no files", "corrupt parquet",
                                  "shards without train"])
def test_bad_hf_sources_are_one_line_errors_before_any_work(load_config, tmp_path, case):
  path = _saved(tmp_path, {"train": TRAIN, "validation": VALIDATION})
  (tmp_path / "empty").mkdir()
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "train-0.parquet").write_bytes(b"PAR1 not really")
  (tmp_path / "valonly").mkdir()
  pq.write_table(pa.table({"text": VALIDATION}), tmp_path / "valonly" / "validation-0.parquet")
  source, overrides, message = {
      "hub name": ("hf:openwebtext", {}, "no directory 'openwebtext'.*never downloaded.*"
                   "download it first"),
      "not saved": (f"hf:{tmp_path}/empty", {}, "is not a dataset saved with "
                    "datasets.save_to_disk"),
      "no text key": (f"hf:{path}", {"data__text_key": "body"}, "text_key='body' is not a "
                      "column of .* \\(it has text, id\\)"),
      "text key not text": (f"hf:{path}", {"data__text_key": "id"}, "text_key='id' of .* "
                            "holds int64, not text"),
      "no such split": (f"hf:{path}", {"data__hf_train_split": "web"}, "hf_train_split='web' is "
                        "not a split of .* \\(it has train, validation\\)"),
      "no files": (f"hf_files:{tmp_path}/empty/*", {}, "matches no .parquet, .arrow, .jsonl"),
      "corrupt parquet": (f"hf_files:{tmp_path}/bad/*", {}, "train-0.parquet is not a readable "
                          ".parquet file"),
      "shards without train": (f"hf_files:{tmp_path}/valonly/*", {}, "has files of split "
                               "'validation' but none of config.data.hf_train_split='train'"),
  }[case]
  c = _config(load_config, tmp_path, source, **overrides)
  with pytest.raises(ip.CorpusError, match=message) as raised:
    prepare.prepare(c, log=lambda *_: None)
  assert "\n" not in str(raised.value)
  assert not (tmp_path / "prepared").exists()  # Nothing written.


def test_a_shard_damaged_mid_read_is_one_line_naming_it(load_config, tmp_path, monkeypatch):
  """A page or record batch that fails to decode partway (the schema read fine)."""
  _write_shards(tmp_path / "shards")
  real = hf_source._table_batches  # pylint: disable=protected-access

  def failing_after_one_batch(path, text_key):
    schema, batches = real(path, text_key)

    def batches_then_damage():
      yield next(iter(batches))
      raise pa.ArrowInvalid("Couldn't deserialize thrift: TProtocolException: Invalid data")
    return schema, batches_then_damage()
  monkeypatch.setattr(hf_source, "_table_batches", failing_after_one_batch)
  c = _config(load_config, tmp_path, f"hf_files:{tmp_path}/shards/*")
  with pytest.raises(ip.CorpusError, match=r"train-00000-of-00002.parquet is damaged after row "
                     r"30: Couldn't deserialize thrift") as raised:
    prepare.prepare(c, log=lambda *_: None)
  assert "\n" not in str(raised.value) and not (tmp_path / "prepared").exists()


def test_train_and_validation_splits_must_differ(load_config, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="data.hf_val_split='train' is invalid: must "
                     "differ from data.hf_train_split"):
    _config(load_config, tmp_path, "hf:/x", data__hf_val_split="train")
