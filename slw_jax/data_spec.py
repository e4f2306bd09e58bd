"""What `data.source` and `data.vocab` say: their forms, the default `data.dir`, an unset corpus.

`data.source` is pystdlib, files:GLOB, tfds:NAME:VERSION or megatron:PATH_PREFIX; `data.vocab`
is byte, spm:PATH or gpt2:PATH (config_lib validates the forms). The paper configs have no
default corpus (`no_corpus_config`): reading data then asks for one (`corpus_missing`).
"""

from __future__ import annotations

import os

from ml_collections import config_dict


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
