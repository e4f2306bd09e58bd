"""`python -m slw_jax.prepare --config=configs/X.py [--config.data.dir=DIR] [--workers=N]
[--memory_mb=MB] [--force]`

Tokenizes the config's `data.source` with `data.vocab` once, into `data.dir`: one flat token
file per split (documents joined by the end-of-document id; uint16 when the vocabulary fits,
else uint32) and `metadata.json` (source, vocabulary and its size, tokens and documents per
split, sha256 of each token file).

Vocabularies (slw_jax.tokenizers_lib, the tokenizer code evaluate and convert use too): `byte`
and `spm:PATH` (the ids of seqio's ByteVocabulary and SentencePieceVocabulary) and `gpt2:PATH`
(GPT-2's BPE from a local tokenizer.json or vocab.json + merges.txt; end of document
`<|endoftext|>`).

Sources: `pystdlib` (the running interpreter's standard library source, skipping test/ and
site-packages/: real text present offline everywhere), `files:GLOB` (.txt files are one document
each; .jsonl lines are documents with a `data.text_key` field), `tfds:NAME` (any TFDS dataset
under `data.tfds_data_dir`; the only source that imports TensorFlow). For pystdlib and files, a
document is held out for validation by a hash of its name, so the split is deterministic and no
document is in both.

Documents are read once, in order, and tokenized by `--workers` processes (default: every core
this process may use) in batches sized so that about `--memory_mb` is in flight
(slw_jax.parallel_encode): the output bytes do not depend on either flag. Progress (documents,
MB, tokens/s, ETA) is logged every PROGRESS_EVERY_S seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from typing import Iterator

from absl import flags

from slw_jax import (cli, data_spec, errors, hf_source, input_pipeline, parallel_encode,
                     tokenizers_lib)
from slw_jax.input_pipeline import METADATA, SPLITS, CorpusError, read_metadata

_FORCE = flags.DEFINE_bool("force", False, "Prepare again even if data.dir is already prepared.")
_WORKERS = flags.DEFINE_integer("workers", None, "Tokenizer processes (default: every core this "
                                "process may use).")
_DATA_JSON = flags.DEFINE_string("data_json", None, "Instead of --config: a JSON file of a "
                                 "config's data section (the trainer prepares this way).")
_MEMORY_MB = flags.DEFINE_integer("memory_mb", 1024, "About how much memory the documents in "
                                  "flight may take (MB); the corpus size does not matter.")

FORMAT_VERSION = 1
PROGRESS_EVERY_S = 30.0
MIN_MEMORY_MB = 16
HF_KINDS = ("hf", "hf_files")  # Hugging Face datasets (slw_jax.hf_source).
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[str]:
  """The interpreter's standard-library .py files, sorted, without tests and site-packages."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(s for s in subfolders if s not in SKIP_DIRS)
    found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
  return sorted(found)


def is_validation(doc_id: str, val_fraction: float) -> bool:
  """Deterministic held-out choice from the document's name (stable across runs and hosts)."""
  digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


def _named_documents(d, on_read=None) -> Iterator[tuple[str, parallel_encode.Document]]:
  """(name, document) of every document of a pystdlib or files source, in a fixed order: a
  text, or an undecoded .jsonl line; `on_read(nbytes)` is told the bytes read (progress)."""
  on_read = on_read or (lambda nbytes: None)
  kind, pattern = data_spec.split_spec(d.source, "pystdlib")
  if kind == "pystdlib":
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_files():
      yield os.path.relpath(path, root), _read_text(path)
      on_read(os.path.getsize(path))
    return
  base = data_spec.glob_base(pattern)
  for path in _source_files(pattern):
    name = os.path.relpath(path, base)  # Where the corpus lives must not change the split.
    if path.endswith(".jsonl"):
      yield from parallel_encode.jsonl_documents(path, name, d.text_key, on_read)
    else:
      yield name, _read_text(path)
      on_read(os.path.getsize(path))


def _source_files(pattern: str) -> list[str]:
  return [p for p in sorted(glob.glob(pattern, recursive=True)) if p.endswith((".txt", ".jsonl"))]


def split_documents(d, split: str) -> Iterator[str]:
  """Texts of one split of the source (non-empty, decoded)."""
  texts = (parallel_encode.document_text(doc) for tag, doc in tagged_documents(d) if tag == split)
  return (text for text in texts if text)


def tagged_documents(d, on_read=None) -> Iterator[tuple[str, parallel_encode.Document]]:
  """(split, document) of the source in a fixed order, read once: texts, or undecoded .jsonl
  lines (parallel_encode.JsonLine). Empty texts are dropped here or by the workers."""
  kind, _ = data_spec.split_spec(d.source, "pystdlib")
  if kind == "tfds":
    for split, tfds_split in (("train", d.tfds_train_split), ("validation", d.tfds_val_split)):
      yield from ((split, text) for text in _tfds_texts(d, tfds_split, on_read))
    return
  if kind in HF_KINDS:
    yield from hf_source.tagged_documents(d, is_validation, on_read or (lambda nbytes: None))
    return
  for name, document in _named_documents(d, on_read):
    if document:
      yield ("validation" if is_validation(name, d.val_fraction) else "train"), document


def check_source(d):
  """CorpusError when a files source matches no .txt or .jsonl file, or the source is a
  Megatron pair (nothing to prepare). (A source whose documents
  are all empty, or a malformed line, is reported when reached: reading a 40 GB corpus twice
  to find it first would double the work.)"""
  kind, pattern = data_spec.split_spec(d.source, "pystdlib")
  if kind == "megatron":
    raise CorpusError(f"config.data.source={d.source!r} is read as is: there is nothing to "
                      "prepare (train with it directly)")
  if kind == "files" and not _source_files(pattern):
    raise CorpusError(f"config.data.source={d.source!r} matches no .txt or .jsonl file")
  if kind in HF_KINDS:
    hf_source.check_source(d)


def source_bytes(d) -> int | None:
  """Bytes the source will read (for the ETA); None when unknown (TFDS)."""
  kind, pattern = data_spec.split_spec(d.source, "pystdlib")
  if kind == "tfds":
    return None
  if kind in HF_KINDS:
    return hf_source.source_bytes(d)
  paths = stdlib_files() if kind == "pystdlib" else _source_files(pattern)
  return sum(os.path.getsize(p) for p in paths)


def make_tokenizer(d) -> tokenizers_lib.Tokenizer:
  """The tokenizer of `data.vocab`, or a one-line CorpusError naming it and the problem."""
  try:
    tokenizer = tokenizers_lib.make_tokenizer(d.vocab)
  except tokenizers_lib.TokenizerError as error:
    hint = (" (train one with python -m slw_jax.prepare --train_spm=PATH)"
            if d.vocab.startswith("spm:") and "does not exist" in str(error) else "")
    reason = str(error).removeprefix(f"vocabulary {d.vocab} ")
    raise CorpusError(f"config.data.vocab={d.vocab!r} is invalid: {reason}{hint}") from None
  if tokenizer.eos_id is None:
    raise CorpusError(f"config.data.vocab={d.vocab!r} is invalid: it has no "
                      f"{tokenizers_lib.GPT2_EOS} token to end each document with")
  return tokenizer


class Progress:
  """Documents, source MB, tokens, rates and an ETA, logged every `every_s` seconds."""

  def __init__(self, total_bytes: int | None, log, every_s: float = PROGRESS_EVERY_S,
               clock=time.monotonic):
    self.total_bytes, self.log, self.every_s, self.clock = total_bytes, log, every_s, clock
    self.start = self.last = clock()
    self.bytes_read = self.documents = self.tokens = 0

  def read(self, nbytes: int):
    self.bytes_read += nbytes

  def wrote(self, documents: int, tokens: int):
    self.documents += documents
    self.tokens += tokens
    if self.clock() - self.last >= self.every_s:
      self.last = self.clock()
      self.log(self.line())

  def line(self) -> str:
    seconds = max(self.clock() - self.start, 1e-9)
    rate = self.bytes_read / seconds
    eta = ""
    if self.total_bytes and rate > 0:
      eta = f", ETA {max(self.total_bytes - self.bytes_read, 0) / rate / 60:.1f} min"
    done = f" of {self.total_bytes / 2**20:,.1f}" if self.total_bytes else ""
    return (f"prepare: {self.documents:,} documents, {self.bytes_read / 2**20:,.1f}{done} MB, "
            f"{self.tokens:,} tokens, {rate / 2**20:.2f} MB/s, {self.tokens / seconds:,.0f} "
            f"tokens/s{eta}")


def default_workers() -> int:
  """Every core this process may use."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def _check_flags(workers: int, memory_mb: int):
  if not (isinstance(workers, int) and workers >= 1):
    raise errors.UsageError(f"--workers={workers} is invalid: must be an integer >= 1")
  if not (isinstance(memory_mb, int) and memory_mb >= MIN_MEMORY_MB):
    raise errors.UsageError(f"--memory_mb={memory_mb} is invalid: must be an integer >= "
                            f"{MIN_MEMORY_MB}")


def _write_splits(d, tokenizer, staging: str, dtype: str, workers: int, memory_mb: int,
                  log) -> dict:
  """Tokenizes the source into `staging`/<split>.bin; returns each split's metadata entry."""
  progress = Progress(source_bytes(d), log)
  files = {s: open(os.path.join(staging, f"{s}.bin"), "wb") for s in SPLITS}
  digests = {s: hashlib.sha256() for s in SPLITS}
  counts = {s: {"tokens": 0, "documents": 0} for s in SPLITS}
  try:
    batches = parallel_encode.batches(tagged_documents(d, progress.read),
                                      parallel_encode.batch_chars(memory_mb, workers))
    for split, documents, data, tokens in parallel_encode.encode_batches(
        batches, d.vocab, dtype, workers):
      files[split].write(data)
      digests[split].update(data)
      counts[split]["tokens"] += tokens
      counts[split]["documents"] += documents
      progress.wrote(documents, tokens)
  finally:
    for f in files.values():
      f.close()
  log(progress.line())
  return {s: {"file": f"{s}.bin", **counts[s], "sha256": digests[s].hexdigest()} for s in SPLITS}


def _recipe(d) -> dict:
  """What determines the prepared bytes (compared to decide whether to prepare again)."""
  recipe = {"source": d.source, "vocab": d.vocab, "text_key": d.text_key,
            "vocab_sha256": _vocab_sha256(d.vocab)}
  kind, _ = data_spec.split_spec(d.source, "pystdlib")
  if kind == "tfds":
    recipe.update(tfds_train_split=d.tfds_train_split, tfds_val_split=d.tfds_val_split)
  else:
    recipe["val_fraction"] = d.val_fraction
  if kind in HF_KINDS:
    recipe.update(hf_train_split=d.hf_train_split, hf_val_split=d.hf_val_split)
  return recipe


def _vocab_sha256(spec: str):
  """sha256 of the vocabulary's file (of both files' bytes, for vocab.json + merges.txt)."""
  try:
    paths = tokenizers_lib.vocab_files(spec)
  except tokenizers_lib.TokenizerError:
    return None  # Missing files: make_tokenizer reports them.
  if not paths or not all(os.path.isfile(p) for p in paths):
    return None
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      digest.update(f.read())
  return digest.hexdigest()


def _replace_dir(new: str, target: str):
  """Moves a finished directory into place; an interrupted prepare leaves no partial data."""
  old = None
  if os.path.exists(target):
    old = f"{target}.old-{os.getpid()}"
    os.rename(target, old)
  os.rename(new, target)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(target: str):
  """Preparing replaces `data.dir` whole (`_replace_dir`): refuse a file, or a directory that
  holds something other than prepared data (a corpus, a run), which that would delete."""
  if os.path.exists(target) and not os.path.isdir(target):
    raise CorpusError(f"config.data.dir={target!r} is a file: it must be a directory (new, "
                      "empty or prepared before)")
  if (os.path.isdir(target) and os.listdir(target) and
      not os.path.isfile(os.path.join(target, METADATA))):
    raise CorpusError(f"config.data.dir={target!r} holds files but no prepared data ({METADATA} "
                      "missing) and preparing replaces it whole: choose a new or empty data.dir")


def _already_prepared(d, recipe: dict, force: bool, log):
  """The metadata when `d.dir` holds this recipe already; CorpusError when it holds another."""
  if not os.path.isfile(os.path.join(d.dir, METADATA)) or force:
    return None
  meta = read_metadata(d.dir)
  if {k: meta.get(k) for k in recipe} == recipe:
    log(f"data already prepared in {d.dir} ({meta['splits']['train']['tokens']:,} train tokens)")
    return meta
  key = next(k for k in recipe if meta.get(k) != recipe[k])
  raise CorpusError(f"config.data.dir={d.dir!r} already holds data prepared with {key}="
                    f"{meta.get(key)!r}, not {recipe[key]!r}: choose another data.dir or pass "
                    "--force to replace it")


def prepare(c, force: bool = False, log=print, workers: int | None = None,
            memory_mb: int = 1024) -> dict:
  """Prepares `c.data` into `c.data.dir` unless it already holds the same recipe."""
  d = c.data
  input_pipeline.require_corpus(d)
  if errors.is_url(d.dir):
    raise CorpusError(f"config.data.dir={d.dir!r}: prepare writes a local directory; prepare "
                      "into one, then copy it to the bucket (gcloud storage cp -r, aws s3 cp "
                      "--recursive) and train with data.dir set to its URL")
  workers = default_workers() if workers is None else workers
  _check_flags(workers, memory_mb)
  recipe = _recipe(d)
  meta = _already_prepared(d, recipe, force, log)
  if meta is not None:
    return meta
  _check_replaceable(d.dir)
  check_source(d)
  tokenizer = make_tokenizer(d)  # Bad vocabulary files fail here, before any work.
  how = ("encoded in this process: faster than sending text to workers"
         if d.vocab in parallel_encode.IN_PROCESS_VOCABS else f"{workers} workers")
  log(f"preparing {d.source} with vocab {d.vocab} into {d.dir} ({how}) ...")
  dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
  parent = os.path.dirname(os.path.abspath(d.dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private; prepared data is for every user.
  try:
    splits = _write_splits(d, tokenizer, staging, dtype, workers, memory_mb, log)
    _check_splits(d, splits)
    meta = dict(recipe, format=FORMAT_VERSION, vocab_size=tokenizer.vocab_size,
                eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, dtype=dtype, splits=splits)
    with open(os.path.join(staging, METADATA), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    _replace_dir(staging, d.dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log(f"prepared {d.dir}: " + ", ".join(f"{s} {i['tokens']:,} tokens / {i['documents']:,} docs"
                                         for s, i in splits.items()))
  return meta


def _check_splits(d, splits: dict):
  if not any(info["documents"] for info in splits.values()):
    raise CorpusError(f"config.data.source={d.source!r} has no text: every document is empty")
  for split, info in splits.items():
    if info["tokens"] == 0:
      raise CorpusError(f"the {split!r} split of config.data.source={d.source!r} is empty "
                        "(for pystdlib/files sources raise data.val_fraction or add documents)")


def train_sentencepiece(d, out_path: str, vocab_size: int, model_type: str = "unigram",
                        log=print) -> str:
  """Trains a SentencePiece model on the train split of `d.source`; returns the .model path.

  Ids match seqio's SentencePieceVocabulary (pad 0, eos 1, unk 2, no bos). Normalization is
  off and whitespace is kept, so decoding gives back exactly the text that was encoded (code
  indentation included); unseen characters fall back to bytes.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if vocab_size < 260:
    raise CorpusError(f"--spm_vocab_size={vocab_size} is invalid: must be >= 260 (256 byte "
                      "pieces + pad, eos, unk + at least one more)")
  input_pipeline.require_corpus(d)
  check_source(d)
  texts = split_documents(d, "train")
  lines = (line for text in texts for line in text.split("\n") if line.strip())
  prefix = out_path[:-len(".model")] if out_path.endswith(".model") else out_path
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  log(f"training a {model_type} SentencePiece model ({vocab_size} pieces) on {d.source} ...")
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_prefix=prefix, vocab_size=vocab_size,
      model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
      character_coverage=1.0, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
      split_digits=True, input_sentence_size=2_000_000, shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1, minloglevel=2)
  log(f"wrote {prefix}.model: use it with --config.data.vocab=spm:{prefix}.model")
  return prefix + ".model"


def _tfds_texts(d, split: str, on_read=None) -> Iterator[str]:
  """Non-empty texts of a TFDS split (imports TensorFlow: this process only prepares)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise CorpusError(f"config.data.source={d.source!r} needs tensorflow-datasets ({error}): "
                      "prepare where requirements.txt is installed, then copy data.dir") from None
  _, name = data_spec.split_spec(d.source, "pystdlib")
  dataset = tfds.load(name, split=split, data_dir=d.tfds_data_dir)
  for example in tfds.as_numpy(dataset):
    raw = example[d.text_key]
    if on_read is not None:
      on_read(len(raw))
    text = raw.decode("utf-8", errors="replace")
    if text:
      yield text


_TRAIN_SPM = flags.DEFINE_string("train_spm", None, "Instead of preparing: train a SentencePiece "
                                 "model on data.source and write it to this .model path.")
_SPM_VOCAB_SIZE = flags.DEFINE_integer("spm_vocab_size", 8192, "Pieces of --train_spm's model.")
_SPM_TYPE = flags.DEFINE_enum("spm_type", "unigram", ["unigram", "bpe"], "--train_spm's model type.")


def _data_config(path: str):
  """A config holding just the data section that `input_pipeline.prepare_in_child` wrote."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  try:
    with open(path) as f:
      return config_dict.ConfigDict({"data": json.load(f)})
  except (OSError, json.JSONDecodeError) as error:
    raise errors.UsageError(f"--data_json={path} is unreadable: {errors.one_line(error)} (it is "
                            "written by the trainer's data preparation step)") from None


EXAMPLE = "python -m slw_jax.prepare --config=configs/tiny.py"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.CONFIG,))
  with cli.exit_on_bad_input():
    if any(arg.startswith("--data_json=") for arg in argv[1:]):
      cli.parse_flags(argv)
      config = _data_config(_DATA_JSON.value)
    else:
      config = cli.parse_config(argv)
    if _TRAIN_SPM.value:
      train_sentencepiece(config.data, _TRAIN_SPM.value, _SPM_VOCAB_SIZE.value, _SPM_TYPE.value)
    else:
      prepare(config, force=_FORCE.value, workers=_WORKERS.value, memory_mb=_MEMORY_MB.value)


if __name__ == "__main__":
  main()
