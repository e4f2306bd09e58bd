"""Prepare (seqio/TFDS side): sources, splits, vocabularies, idempotence and errors."""

import json
import os

import numpy as np
import pytest

from slw_jax import config_lib, errors
from slw_jax import input_pipeline as ip
from slw_jax import parallel_encode, prepare

DOCS = {"a.txt": "def alpha():\n    return 1\n", "b.txt": "héllo wörld ✓\n" * 20,
        "c.txt": "class C:\n\tpass\n" * 30, "empty.txt": ""}
JSONL = [{"text": f"document number {i}: " + "x" * (i * 7)} for i in range(40)]


@pytest.fixture
def corpus(tmp_path):
  folder = tmp_path / "corpus"
  folder.mkdir()
  for name, text in DOCS.items():
    (folder / name).write_text(text, encoding="utf-8")
  with open(folder / "d.jsonl", "w") as f:
    for record in JSONL:
      f.write(json.dumps(record) + "\n")
  return folder


def _config(load_config, tmp_path, **overrides):
  overrides.setdefault("data__dir", str(tmp_path / "prepared"))
  overrides.setdefault("pacing__multiple", 8)
  return config_lib.validate(load_config("tiny", **overrides))


def _decode_bytes(ids):
  """ByteVocabulary ids (byte + 3; eos 1 ends each document) -> document texts."""
  ids = np.asarray(ids, np.int64)
  ends = np.nonzero(ids == 1)[0]
  assert len(ends) and ends[-1] == len(ids) - 1
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [bytes((ids[s:e] - 3).tolist()).decode("utf-8") for s, e in zip(starts, ends)]


@pytest.mark.slow
def test_files_source_splits_and_contents(load_config, tmp_path, corpus):
  c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2)
  meta = prepare.prepare(c, log=lambda *_: None)
  texts = {s: _decode_bytes(np.fromfile(tmp_path / "prepared" / f"{s}.bin", np.uint16).astype(
      np.int64)) for s in ip.SPLITS}
  expected = [t for n, t in sorted(DOCS.items()) if t] + [r["text"] for r in JSONL]
  assert sorted(texts["train"] + texts["validation"]) == sorted(expected)
  assert not set(texts["train"]) & set(texts["validation"])  # No document in both.
  assert texts["validation"]  # 20% of 43 documents.
  for split in ip.SPLITS:
    info = meta["splits"][split]
    assert info["documents"] == len(texts[split])
    assert info["tokens"] == os.path.getsize(tmp_path / "prepared" / info["file"]) // 2
  assert meta["vocab_size"] == 259 and meta["eos_id"] == 1 and meta["dtype"] == "uint16"
  import seqio  # pylint: disable=g-import-not-at-top
  byte_vocab = seqio.ByteVocabulary()  # The ids every earlier release prepared with seqio.
  expected = [list(byte_vocab.encode(t)) for t in prepare.split_documents(c.data, "train")]
  assert _documents_of(tmp_path / "prepared" / "train.bin", np.uint16, 1) == expected


def test_prepare_is_idempotent_and_byte_identical(load_config, tmp_path, corpus):
  c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2)
  prepare.prepare(c, log=lambda *_: None)
  first = {f: (tmp_path / "prepared" / f).read_bytes() for f in os.listdir(tmp_path / "prepared")}
  logged = []
  prepare.prepare(c, log=logged.append)
  assert "already prepared" in logged[0]
  prepare.prepare(c, force=True, log=lambda *_: None)
  second = {f: (tmp_path / "prepared" / f).read_bytes() for f in os.listdir(tmp_path / "prepared")}
  assert first == second
  changed = _config(load_config, tmp_path, data__source=f"files:{corpus}/*",
                    data__val_fraction=0.3)
  with pytest.raises(ip.CorpusError, match="val_fraction=0.2, not 0.3"):
    prepare.prepare(changed, log=lambda *_: None)


def test_default_corpus_is_the_stdlib_and_prepares_identically(load_config, tmp_path):
  files = prepare.stdlib_files()
  assert len(files) > 300 and not any(f"{os.sep}test{os.sep}" in f for f in files)
  assert not any("site-packages" in f for f in files)
  c = _config(load_config, tmp_path)
  meta = prepare.prepare(c, log=lambda *_: None)
  assert meta["source"] == "pystdlib" and meta["splits"]["train"]["tokens"] > 5_000_000
  again = _config(load_config, tmp_path, data__dir=str(tmp_path / "again"))
  assert prepare.prepare(again, log=lambda *_: None)["splits"] == meta["splits"]
  loader, validation = ip.open_training_data(c, log=lambda *_: None)  # Checksums verified.
  batch = loader.next_batch(16, 64)
  assert batch.inputs.shape == (16, 64) and batch.inputs.max() < 259
  assert validation.num_windows > 16


def test_ensure_prepared_prepares_a_missing_directory(load_config, tmp_path, corpus):
  c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2,
              pacing__seqlen_end=16, pacing__seqlen_start=8, batch_size=4)
  loader, _ = ip.open_training_data(c, log=lambda *_: None)
  assert os.path.isfile(tmp_path / "prepared" / ip.METADATA)
  assert loader.next_batch(4, 8).inputs.shape == (4, 8)


@pytest.mark.slow
def test_sentencepiece_training_and_round_trip(load_config, tmp_path, corpus):
  import seqio
  c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2)
  path = prepare.train_sentencepiece(c.data, str(tmp_path / "spm" / "tiny.model"), 300,
                                     log=lambda *_: None)
  vocab = seqio.SentencePieceVocabulary(path)
  assert vocab.vocab_size == 300 and vocab.eos_id == 1 and vocab.pad_id == 0
  text = "def alpha():\n\treturn 'héllo ✓ 日本'  \n\n  # trailing spaces  "
  assert vocab.decode(vocab.encode(text)) == text
  byte_vocab = seqio.ByteVocabulary()
  assert byte_vocab.decode(byte_vocab.encode(text)) == text
  # Evaluation tokenizes without TensorFlow (tokenizers_lib): the same ids as the prepared data.
  from slw_jax import tokenizers_lib  # pylint: disable=g-import-not-at-top
  assert tokenizers_lib.make_tokenizer(f"spm:{path}").encode(text) == list(vocab.encode(text))
  assert tokenizers_lib.make_tokenizer("byte").encode(text) == list(byte_vocab.encode(text))
  spm_cfg = _config(load_config, tmp_path, data__source=f"files:{corpus}/*",
                    data__val_fraction=0.2, data__vocab=f"spm:{path}",
                    data__dir=str(tmp_path / "spm_data"), model__vocab_size=300)
  meta = prepare.prepare(spm_cfg, log=lambda *_: None)
  assert meta["vocab_size"] == 300 and meta["vocab_sha256"]
  # Prepared without seqio, the data holds seqio's ids: each document's, then seqio's eos.
  expected = [list(vocab.encode(t)) for t in prepare.split_documents(spm_cfg.data, "train")]
  assert _documents_of(tmp_path / "spm_data" / "train.bin", np.uint16, vocab.eos_id) == expected
  too_small = _config(load_config, tmp_path, data__vocab=f"spm:{path}",
                      data__dir=str(tmp_path / "spm_data"), data__source=f"files:{corpus}/*",
                      data__val_fraction=0.2, model__vocab_size=280)
  with pytest.raises(ip.CorpusError, match="config.model.vocab_size=280 is too small"):
    ip.open_training_data(too_small, log=lambda *_: None)


def test_source_errors(load_config, tmp_path, corpus):
  quiet = lambda *_: None  # noqa: E731
  nothing = _config(load_config, tmp_path, data__source=f"files:{tmp_path}/none/*.txt")
  with pytest.raises(ip.CorpusError, match="matches no .txt or .jsonl file"):
    prepare.prepare(nothing, log=quiet)
  only_empty = _config(load_config, tmp_path, data__source=f"files:{corpus}/empty.txt")
  with pytest.raises(ip.CorpusError, match="has no text"):
    prepare.prepare(only_empty, log=quiet)
  (corpus / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  bad = _config(load_config, tmp_path, data__source=f"files:{corpus}/bad.jsonl")
  with pytest.raises(ip.CorpusError, match=r"bad.jsonl:2 has no string field"):
    prepare.prepare(bad, log=quiet)
  missing_spm = _config(load_config, tmp_path, data__source=f"files:{corpus}/*.txt",
                        data__vocab="spm:/no/such.model")
  with pytest.raises(ip.CorpusError, match="invalid: does not exist .* --train_spm=PATH"):
    prepare.prepare(missing_spm, log=quiet)
  assert not (tmp_path / "prepared").exists()  # Nothing half-written.


def test_corpus_too_small_for_windows_or_batch(load_config, tmp_path):
  quiet = lambda *_: None  # noqa: E731
  small = tmp_path / "small"
  small.mkdir()
  for i in range(20):
    (small / f"{i}.txt").write_text(f"doc {i:04d}\n")
  tiny_corpus = dict(data__source=f"files:{small}/*.txt", data__val_fraction=0.5)
  with pytest.raises(ip.CorpusError, match=r"split has \d+ tokens: too few for one window"):
    ip.open_training_data(_config(load_config, tmp_path, **tiny_corpus), log=quiet)
  big_batch = _config(load_config, tmp_path, pacing__seqlen_end=8, pacing__seqlen_start=8,
                      batch_size=4096, **tiny_corpus)
  with pytest.raises(ip.CorpusError, match="smaller than one global batch of 4096"):
    ip.open_training_data(big_batch, log=quiet)


def test_split_does_not_depend_on_where_the_corpus_lives(load_config, tmp_path, corpus):
  moved = tmp_path / "elsewhere" / "deeper"
  moved.parent.mkdir()
  os.rename(corpus, moved)
  here = _config(load_config, tmp_path, data__source=f"files:{moved}/*", data__val_fraction=0.2)
  names = [n for n, _ in prepare._named_documents(here.data)]  # pylint: disable=protected-access
  assert names[:3] == ["a.txt", "b.txt", "c.txt"] and "d.jsonl:1" in names


@pytest.mark.slow
def test_tfds_source_through_seqio(load_config, tmp_path):
  import tensorflow_datasets as tfds
  c = _config(load_config, tmp_path, data__source="tfds:lm1b:1.1.0", data__tfds_val_split="test")
  with tfds.testing.mock_data(num_examples=30):  # Random examples in lm1b's schema, offline.
    meta = prepare.prepare(c, log=lambda *_: None)
  assert meta["splits"]["train"]["documents"] == 30
  assert meta["splits"]["validation"]["documents"] == 30
  assert meta["tfds_val_split"] == "test"
  tokens = np.fromfile(tmp_path / "prepared" / "train.bin", np.uint16)
  assert (tokens == 1).sum() == 30  # One end-of-document id per example.


def test_cli_reports_a_bad_source_in_one_line(tmp_path):
  import subprocess
  import sys
  from conftest import REPO
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.prepare", "--config=configs/tiny.py",
       f"--config.data.source=files:{tmp_path}/none/*.txt", f"--config.data.dir={tmp_path}/d"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "matches no .txt or .jsonl file" in errors[0]
  assert "Traceback" not in result.stderr


# ----- GPT-2 BPE data and parallel preparation -------------------------------------------------

def _local_gpt2_bpe(folder, texts, vocab_size=400):
  """A small byte-level BPE trained here (nothing downloaded), saved both ways GPT-2 ships:
  tokenizer.json, and vocab.json + merges.txt; `<|endoftext|>` is its end of document."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
  folder.mkdir(parents=True, exist_ok=True)
  bpe.save(str(folder / "tokenizer.json"))
  pair = folder / "pair"
  pair.mkdir()
  bpe.save_model(str(pair))
  return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def _documents_of(path, dtype, eos):
  ids = np.fromfile(path, dtype).astype(np.int64)
  ends = np.nonzero(ids == eos)[0]
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [ids[s:e].tolist() for s, e in zip(starts, ends)]


def test_gpt2_bpe_data_has_the_tokenizers_librarys_ids(load_config, tmp_path, corpus):
  texts = [t for _, t in sorted(DOCS.items()) if t] + [r["text"] for r in JSONL]
  reference = _local_gpt2_bpe(tmp_path / "bpe", texts)
  eos = reference.token_to_id("<|endoftext|>")
  for spec, workers in ((tmp_path / "bpe" / "tokenizer.json", 1), (tmp_path / "bpe" / "pair", 2)):
    c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2,
                data__vocab=f"gpt2:{spec}", data__dir=str(tmp_path / f"gpt2_{workers}"),
                model__vocab_size=reference.get_vocab_size())
    meta = prepare.prepare(c, log=lambda *_: None, workers=workers)
    assert meta["eos_id"] == eos and meta["vocab_size"] == reference.get_vocab_size()
    assert meta["vocab_sha256"] and meta["dtype"] == "uint16"
    train = _documents_of(tmp_path / f"gpt2_{workers}" / "train.bin", np.uint16, eos)
    expected = [reference.encode(t, add_special_tokens=False).ids
                for t in prepare.split_documents(c.data, "train")]
    assert train == expected and len(train) == meta["splits"]["train"]["documents"]


@pytest.mark.parametrize("vocab", ["spm", "gpt2"])
def test_any_worker_count_writes_the_same_bytes(load_config, tmp_path, corpus, vocab):
  """--workers=1 and --workers=3 (spawned processes, small batches so that every worker gets
  several) write identical token files and metadata."""
  if vocab == "gpt2":
    _local_gpt2_bpe(tmp_path / "bpe", [r["text"] for r in JSONL] + list(DOCS.values()))
    vocab = f"gpt2:{tmp_path / 'bpe' / 'tokenizer.json'}"
  else:
    c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*")
    vocab = "spm:" + prepare.train_sentencepiece(c.data, str(tmp_path / "spm.model"), 300,
                                                 log=lambda *_: None)
  prepared = {}
  for workers in (1, 3):
    c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*", data__val_fraction=0.2,
                data__vocab=vocab, data__dir=str(tmp_path / f"w{workers}"))
    prepare.prepare(c, log=lambda *_: None, workers=workers, memory_mb=prepare.MIN_MEMORY_MB)
    prepared[workers] = {f: (tmp_path / f"w{workers}" / f).read_bytes()
                         for f in sorted(os.listdir(tmp_path / f"w{workers}"))}
  assert prepared[1] == prepared[3] and len(prepared[1]) == 3


def test_encoding_streams_with_a_bounded_number_of_documents_in_flight(tmp_path):
  """Batches are taken from the document stream only as results come back: never more than
  IN_FLIGHT batches per worker ahead, whatever the corpus size."""
  _local_gpt2_bpe(tmp_path / "bpe", [f"document {i:03d}" for i in range(200)], vocab_size=300)
  vocab = f"gpt2:{tmp_path / 'bpe' / 'tokenizer.json'}"
  read = []

  def documents():
    for i in range(200):
      read.append(i)
      yield "train", f"document {i:03d}"  # 12 characters: one document per 10-char batch.
  ahead = []
  batches = parallel_encode.batches(documents(), 10)
  for tag, count, data, tokens in parallel_encode.encode_batches(batches, vocab, "uint16", 2):
    ahead.append(len(read) - len(ahead))
    assert tag == "train" and count == 1 and len(data) == 2 * tokens
  assert len(ahead) == 200 and max(ahead) <= parallel_encode.IN_FLIGHT * 2
  assert parallel_encode.batch_chars(64, 4) == 64 * 2**20 // (
      parallel_encode.IN_FLIGHT * 4 * parallel_encode.BYTES_PER_CHAR)
  assert parallel_encode.batch_chars(10**6, 1) == parallel_encode.MAX_BATCH_CHARS


class _DyingLine(parallel_encode.JsonLine):
  """A document whose decoding kills the worker process (as the OOM killer would)."""

  def text(self):
    os._exit(9)  # pylint: disable=protected-access


def test_a_worker_that_dies_is_a_one_line_error_not_a_hang(tmp_path):
  _local_gpt2_bpe(tmp_path / "bpe", ["some text"] * 5, vocab_size=270)
  vocab = f"gpt2:{tmp_path / 'bpe' / 'tokenizer.json'}"
  batches = [("train", ["fine"]), ("train", [_DyingLine("x.jsonl", 1, b"{}", "text")])]
  with pytest.raises(ip.CorpusError, match=r"^a tokenizer worker process died \(out of memory"):
    list(parallel_encode.encode_batches(iter(batches), vocab, "uint16", 2))


def test_bad_vocabularies_and_flags_are_one_line_errors(load_config, tmp_path, corpus):
  quiet = lambda *_: None  # noqa: E731
  broken = tmp_path / "broken.json"
  broken.write_text('{"model": ')
  no_eos = tmp_path / "no_eos"
  import tokenizers  # pylint: disable=g-import-not-at-top
  plain = tokenizers.ByteLevelBPETokenizer()
  plain.train_from_iterator(["some text"] * 5, vocab_size=270, min_frequency=1)
  no_eos.mkdir()
  plain.save(str(no_eos / "tokenizer.json"))
  cases = [(f"gpt2:{broken}", r"is not a readable GPT-2 tokenizer \(.*broken.json: EOF"),
           (f"gpt2:{no_eos}", r"it has no <\|endoftext\|> token"),
           (f"gpt2:{tmp_path}/none.json", "does not exist")]
  for vocab, message in cases:
    c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*.txt", data__vocab=vocab)
    with pytest.raises(ip.CorpusError, match=r"^config.data.vocab='gpt2:[^']*' is invalid: " + message):
      prepare.prepare(c, log=quiet)
  c = _config(load_config, tmp_path, data__source=f"files:{corpus}/*.txt")
  with pytest.raises(errors.UsageError, match="--workers=0 is invalid: must be an integer >= 1"):
    prepare.prepare(c, log=quiet, workers=0)
  with pytest.raises(errors.UsageError, match="--memory_mb=1 is invalid"):
    prepare.prepare(c, log=quiet, memory_mb=1)
  assert not (tmp_path / "prepared").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".prepare-")]  # No staging left.


def test_progress_reports_documents_rates_and_an_eta():
  now = [0.0]
  lines = []
  progress = prepare.Progress(total_bytes=4 * 2**20, log=lines.append, every_s=10,
                              clock=lambda: now[0])
  progress.read(2**20)
  now[0] = 5.0
  progress.wrote(3, 1000)
  assert not lines  # Not yet 10 s.
  progress.read(2**20)
  now[0] = 10.0
  progress.wrote(2, 500)
  assert lines == ["prepare: 5 documents, 2.0 of 4.0 MB, 1,500 tokens, 0.20 MB/s, 150 tokens/s, "
                   "ETA 0.2 min"]


def test_paper_configs_demand_a_corpus_in_one_line(load_config, tmp_path):
  """The paper configs (GPT-2's 50257 ids) have no default corpus: plan works without one;
  preparing or training asks for data.source and data.vocab, naming both flags."""
  from slw_jax import plan  # pylint: disable=g-import-not-at-top
  c = config_lib.validate(load_config("gpt2_117m"))
  assert c.data.source is None and c.data.vocab is None and c.data.dir is None
  assert plan.build_plan(c, every=10_000)["total_steps"] > 300_000
  message = (r"^config.data.source and config.data.vocab are unset: this config has no default "
             r"corpus; pass --config.data.source=files:GLOB .* --config.data.vocab=gpt2:PATH")
  with pytest.raises(ip.CorpusError, match=message):
    prepare.prepare(c, log=lambda *_: None)
  with pytest.raises(ip.CorpusError, match=message):
    ip.open_training_data(c, log=lambda *_: None)
  only_source = config_lib.validate(load_config("gpt3_125m", data__source="files:x/*.txt"))
  with pytest.raises(ip.CorpusError, match=r"^config.data.vocab is unset"):
    prepare.prepare(only_source, log=lambda *_: None)
  named = config_lib.validate(load_config("gpt2_117m", data__source="files:x/*.jsonl",
                                          data__vocab="gpt2:tok.json"))
  assert named.data.dir == "data/files-x-jsonl_gpt2-tok"
