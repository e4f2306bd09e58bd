"""`python -m slw_jax.prepare --config=configs/X.py [--config.data.dir=DIR] [--force]`

Tokenizes the config's `data.source` with `data.vocab` through a seqio Task, once, into
`data.dir`: one flat token file per split (documents joined by the end-of-document id; uint16
when the vocabulary fits, else uint32) and `metadata.json` (source, vocabulary and its size,
tokens and documents per split, sha256 of each token file). This is the only module that
imports TensorFlow (through seqio); the trainer reads the output with numpy.

Sources: `pystdlib` (the running interpreter's standard library source, skipping test/ and
site-packages/: real text present offline everywhere), `files:GLOB` (.txt files are one document
each; .jsonl lines are documents with a `data.text_key` field), `tfds:NAME` (any TFDS dataset
under `data.tfds_data_dir`). For pystdlib and files, a document is held out for validation by a
hash of its name, so the split is deterministic and no document is in both.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from typing import Iterator

from absl import flags

from slw_jax import cli, config_lib
from slw_jax.input_pipeline import METADATA, SPLITS, CorpusError, read_metadata

_FORCE = flags.DEFINE_bool("force", False, "Prepare again even if data.dir is already prepared.")

FORMAT_VERSION = 1
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


def _named_documents(d) -> Iterator[tuple[str, str]]:
  """(name, text) of every document of a pystdlib or files source, in a fixed order."""
  kind, pattern = config_lib.split_spec(d.source, "pystdlib")
  if kind == "pystdlib":
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_files():
      yield os.path.relpath(path, root), _read_text(path)
    return
  base = _glob_base(pattern)
  for path in sorted(glob.glob(pattern, recursive=True)):
    name = os.path.relpath(path, base)  # Where the corpus lives must not change the split.
    if path.endswith(".jsonl"):
      yield from _jsonl_documents(path, name, d.text_key)
    elif path.endswith(".txt"):
      yield name, _read_text(path)


def _glob_base(pattern: str) -> str:
  """The folder part of a glob before its first wildcard: 'a/b/*/x.txt' -> 'a/b'."""
  parts = pattern.split(os.sep)
  fixed = [p for p in itertools.takewhile(lambda p: not glob.has_magic(p), parts)]
  return os.sep.join(fixed[:len(parts) - 1]) or "."


def _jsonl_documents(path: str, name: str, text_key: str) -> Iterator[tuple[str, str]]:
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise CorpusError(f"{path}:{number} is not valid JSON ({error.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise CorpusError(f"{path}:{number} has no string field data.text_key={text_key!r}")
      yield f"{name}:{number}", record[text_key]


def split_documents(d, split: str) -> Iterator[str]:
  """Texts of one split of a pystdlib or files source."""
  held_out = split == "validation"
  for name, text in _named_documents(d):
    if text and is_validation(name, d.val_fraction) == held_out:
      yield text


def check_source(d):
  """CorpusError when a pystdlib or files source has no text or a malformed document.

  Reads every document once, before TensorFlow is involved, so that a bad line is reported
  as itself rather than wrapped in a tf.data error.
  """
  kind, pattern = config_lib.split_spec(d.source, "pystdlib")
  if kind == "tfds":
    return
  if kind == "files" and not any(p.endswith((".txt", ".jsonl"))
                                 for p in glob.glob(pattern, recursive=True)):
    raise CorpusError(f"config.data.source={d.source!r} matches no .txt or .jsonl file")
  non_empty = sum(1 for _, text in _named_documents(d) if text.strip())
  if not non_empty:
    raise CorpusError(f"config.data.source={d.source!r} has no text: every document is empty")


def make_vocabulary(d):
  """seqio vocabulary of `data.vocab`: ByteVocabulary or SentencePieceVocabulary."""
  import seqio  # pylint: disable=g-import-not-at-top
  kind, path = config_lib.split_spec(d.vocab, "byte")
  if kind == "byte":
    return seqio.ByteVocabulary()
  if not os.path.isfile(path):
    raise CorpusError(f"config.data.vocab={d.vocab!r} is invalid: no SentencePiece model at "
                      f"{path} (train one with python -m slw_jax.prepare --train_spm=PATH)")
  return seqio.SentencePieceVocabulary(path)


def make_task(d, vocabulary):
  """A seqio Task that yields {'text': token ids + end-of-document} per document."""
  import functools  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  kind, arg = config_lib.split_spec(d.source, "pystdlib")
  preprocessors = []
  if kind == "tfds":
    splits = {"train": d.tfds_train_split, "validation": d.tfds_val_split}
    source = seqio.TfdsDataSource(tfds_name=arg, tfds_data_dir=d.tfds_data_dir, splits=splits)
    preprocessors.append(functools.partial(seqio.preprocessors.rekey,
                                           key_map={"text": d.text_key}))
  else:
    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed  # Order is fixed: the loader shuffles windows instead.
      texts = tf.data.Dataset.from_generator(lambda: split_documents(d, split),
                                             output_signature=tf.TensorSpec((), tf.string))
      return texts.map(lambda text: {"text": text})
    source = seqio.FunctionDataSource(dataset_fn, splits=SPLITS)
  preprocessors += [functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                    seqio.preprocessors.append_eos]
  name = "slw_" + os.path.basename(d.dir).replace("-", "_")
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  features = {"text": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)}
  return seqio.TaskRegistry.add(name, source=source, preprocessors=preprocessors,
                                output_features=features)


def _write_split(task, split: str, path: str, dtype: str) -> dict:
  """Streams one split's token ids into `path`; returns its metadata entry."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                             use_cached=False, try_in_mem_cache=False)
  digest, tokens, documents = hashlib.sha256(), 0, 0
  with open(path, "wb") as f:
    for example in dataset.as_numpy_iterator():
      data = np.asarray(example["text"]).astype(dtype).tobytes()
      f.write(data)
      digest.update(data)
      tokens += len(example["text"])
      documents += 1
  return {"file": os.path.basename(path), "tokens": tokens, "documents": documents,
          "sha256": digest.hexdigest()}


def _recipe(d) -> dict:
  """What determines the prepared bytes (compared to decide whether to prepare again)."""
  kind, path = config_lib.split_spec(d.vocab, "byte")
  recipe = {"source": d.source, "vocab": d.vocab, "text_key": d.text_key,
            "vocab_sha256": None if kind == "byte" else _sha256_or_none(path)}
  if d.source.startswith("tfds:"):
    recipe.update(tfds_train_split=d.tfds_train_split, tfds_val_split=d.tfds_val_split)
  else:
    recipe["val_fraction"] = d.val_fraction
  return recipe


def _sha256_or_none(path: str):
  return hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None


def _replace_dir(new: str, target: str):
  """Moves a finished directory into place; an interrupted prepare leaves no partial data."""
  old = None
  if os.path.exists(target):
    old = f"{target}.old-{os.getpid()}"
    os.rename(target, old)
  os.rename(new, target)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def prepare(c, force: bool = False, log=print) -> dict:
  """Prepares `c.data` into `c.data.dir` unless it already holds the same recipe."""
  d = c.data
  recipe = _recipe(d)
  if os.path.isfile(os.path.join(d.dir, METADATA)) and not force:
    meta = read_metadata(d.dir)
    if {k: meta.get(k) for k in recipe} == recipe:
      log(f"data already prepared in {d.dir} ({meta['splits']['train']['tokens']:,} train tokens)")
      return meta
    key = next(k for k in recipe if meta.get(k) != recipe[k])
    raise CorpusError(f"config.data.dir={d.dir!r} already holds data prepared with {key}="
                      f"{meta.get(key)!r}, not {recipe[key]!r}: choose another data.dir or pass "
                      "--force to replace it")
  check_source(d)
  log(f"preparing {d.source} with vocab {d.vocab} into {d.dir} ...")
  vocabulary = make_vocabulary(d)
  task = make_task(d, vocabulary)
  dtype = "uint16" if vocabulary.vocab_size <= 2**16 else "uint32"
  parent = os.path.dirname(os.path.abspath(d.dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
  os.chmod(staging, 0o755)  # mkdtemp makes it private; prepared data is for every user.
  try:
    splits = {s: _write_split(task, s, os.path.join(staging, f"{s}.bin"), dtype) for s in SPLITS}
    for split, info in splits.items():
      if info["tokens"] == 0:
        raise CorpusError(f"the {split!r} split of config.data.source={d.source!r} is empty "
                          "(for pystdlib/files sources raise data.val_fraction or add documents)")
    meta = dict(recipe, format=FORMAT_VERSION, vocab_size=vocabulary.vocab_size,
                eos_id=vocabulary.eos_id, pad_id=vocabulary.pad_id, dtype=dtype, splits=splits)
    with open(os.path.join(staging, METADATA), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    _replace_dir(staging, d.dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  log(f"prepared {d.dir}: " + ", ".join(f"{s} {i['tokens']:,} tokens / {i['documents']:,} docs"
                                         for s, i in splits.items()))
  return meta


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
  check_source(d)
  if d.source.startswith("tfds:"):
    texts = _tfds_texts(d)
  else:
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


def _tfds_texts(d) -> Iterator[str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _, name = config_lib.split_spec(d.source, "pystdlib")
  dataset = tfds.load(name, split=d.tfds_train_split, data_dir=d.tfds_data_dir)
  for example in tfds.as_numpy(dataset):
    yield example[d.text_key].decode("utf-8", errors="replace")


_TRAIN_SPM = flags.DEFINE_string("train_spm", None, "Instead of preparing: train a SentencePiece "
                                 "model on data.source and write it to this .model path.")
_SPM_VOCAB_SIZE = flags.DEFINE_integer("spm_vocab_size", 8192, "Pieces of --train_spm's model.")
_SPM_TYPE = flags.DEFINE_enum("spm_type", "unigram", ["unigram", "bpe"], "--train_spm's model type.")


def main(argv=None):
  argv = sys.argv if argv is None else argv
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if _TRAIN_SPM.value:
      train_sentencepiece(config.data, _TRAIN_SPM.value, _SPM_VOCAB_SIZE.value, _SPM_TYPE.value)
    else:
      prepare(config, force=_FORCE.value)


if __name__ == "__main__":
  main()
