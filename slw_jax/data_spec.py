"""What `data.source` and `data.vocab` say: their forms, the default `data.dir`, an unset corpus.

`data.source` is pystdlib, files:GLOB, tfds:NAME:VERSION, megatron:PATH_PREFIX, hf:PATH or
hf_files:GLOB; `data.vocab` is byte, spm:PATH or gpt2:PATH (`validate` checks the forms). The
paper configs have no default corpus (`no_corpus_config`): reading data then asks for one
(`corpus_missing`).
"""

from __future__ import annotations

import glob
import itertools
import os

from ml_collections import config_dict

from slw_jax import errors
from slw_jax.errors import config_check, is_int

DATA_MODES = ("truncate", "reshape")
SOURCE_FORMS = ("pystdlib, files:GLOB, tfds:NAME:VERSION (e.g. tfds:lm1b:1.1.0), "
                "megatron:PATH_PREFIX (a Megatron .bin + .idx pair), hf:PATH (a dataset saved "
                "with datasets.save_to_disk) or hf_files:GLOB (.parquet/.arrow/.jsonl shards)")
VOCAB_FORMS = "byte, spm:PATH or gpt2:PATH"
METADATA = "metadata.json"  # What `prepare` writes last into data.dir.
SPLITS = ("train", "validation")


class CorpusError(errors.InputError):
  """Prepared data that is missing, damaged or unusable with this config (one-line message)."""


WITH_ARGUMENT = ("files", "megatron", "hf", "hf_files")  # Source kinds that need a PATH or GLOB.


def split_spec(spec: str, simple: str) -> tuple[str, str]:
  """'files:a/*.txt' -> ('files', 'a/*.txt'); 'pystdlib' -> ('pystdlib', '')."""
  if spec == simple:
    return spec, ""
  kind, _, arg = spec.partition(":")
  return kind, arg


def _slug(text: str) -> str:
  keep = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
  return "-".join(part for part in keep.split("-") if part)[:60]


def default_data_dir(d) -> str:
  """data/<source>_<vocab>, so preparing another source or vocabulary never overwrites."""
  source_kind, source_arg = split_spec(d.source, "pystdlib")
  vocab_kind, vocab_arg = split_spec(d.vocab, "byte")
  source = _slug(f"{source_kind}-{source_arg}")
  vocab = _slug(f"{vocab_kind}-{os.path.splitext(os.path.basename(vocab_arg))[0]}")
  return os.path.join("data", f"{source}_{vocab}")


def no_corpus_config(config) -> config_dict.ConfigDict:
  """`config` without a default corpus: `data.source` and `data.vocab` must be passed (the
  paper configs: their 50257-id GPT-2 model needs GPT-2 BPE data, which no machine has
  offline). Validation accepts it (plan needs no data); reading data asks for them."""
  config.data.source = config_dict.placeholder(str)
  config.data.vocab = config_dict.placeholder(str)
  return config


def corpus_missing(d) -> str | None:
  """The one-line complaint about an unset data.source / data.vocab, or None."""
  unset = [f"data.{k}" for k in ("source", "vocab") if d[k] is None]
  if not unset:
    return None
  return (f"config.{' and config.'.join(unset)} {'is' if len(unset) == 1 else 'are'} unset: "
          "this config has no default corpus; pass --config.data.source=files:GLOB (.txt/.jsonl "
          "documents; or tfds:NAME:VERSION, megatron:PATH_PREFIX) and "
          "--config.data.vocab=gpt2:PATH (GPT-2's tokenizer.json, or a directory with "
          "vocab.json + merges.txt); docs/data.md, \"Real corpora\"")


def glob_base(pattern: str) -> str:
  """The folder part of a glob before its first wildcard: 'a/b/*/x.txt' -> 'a/b'."""
  parts = pattern.split(os.sep)
  fixed = [p for p in itertools.takewhile(lambda p: not glob.has_magic(p), parts)]
  return os.sep.join(fixed[:len(parts) - 1]) or "."


def validate(d, model):
  """The data section's forms and ranges (config_lib.validate); ConfigError on the first bad
  one."""
  if d.source is not None:
    kind, arg = split_spec(d.source, "pystdlib")
    ok = (kind == "pystdlib" or (kind in WITH_ARGUMENT and arg) or
          (kind == "tfds" and ":" in arg and all(arg.split(":"))))
    config_check(ok, "data.source", d.source, f"must be {SOURCE_FORMS}")
  if d.vocab is not None:
    kind, arg = split_spec(d.vocab, "byte")
    config_check(kind == "byte" or (kind in ("spm", "gpt2") and arg), "data.vocab", d.vocab,
                 f"must be {VOCAB_FORMS}")
  config_check(d.mode in DATA_MODES, "data.mode", d.mode,
               f"must be one of {', '.join(DATA_MODES)}")
  config_check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
  config_check(is_int(d.prefetch) and d.prefetch >= 0, "data.prefetch", d.prefetch,
               "must be an integer >= 0 (0 = no background thread)")
  config_check(not errors.is_url(d.cache_dir), "data.cache_dir", d.cache_dir,
               "must be a local directory (a data.dir URL is staged there)")
  for key in ("hf_train_split", "hf_val_split"):
    config_check(isinstance(d[key], str) and d[key], f"data.{key}", d[key],
                 "must be a split name")
  config_check(d.hf_val_split != d.hf_train_split, "data.hf_val_split", d.hf_val_split,
               "must differ from data.hf_train_split (absent from the dataset, validation is "
               "held out of train)")
  config_check(d.vocab != "byte" or model.vocab_size >= 259, "model.vocab_size",
               model.vocab_size, "must be >= 259 for the byte vocabulary (256 bytes + pad, "
               "eos, unk)")
