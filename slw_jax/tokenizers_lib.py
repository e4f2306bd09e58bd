"""Text -> token ids without TensorFlow, matching the ids the prepared data uses.

- `byte`: seqio's ByteVocabulary (UTF-8 bytes shifted by 3: pad 0, eos 1, unk 2).
- `spm:PATH`: a SentencePiece model, ids as in the model (seqio uses them unchanged).
- `gpt2:PATH`: GPT-2's byte-level BPE, from a `tokenizer.json` or a directory holding either
  `tokenizer.json` or `vocab.json` + `merges.txt` (the `tokenizers` package; no download).
"""

from __future__ import annotations

import os

from slw_jax import config_lib

BYTE_OFFSET = 3  # seqio.ByteVocabulary: ids 0-2 are pad, eos, unk.


class Tokenizer:
  """`encode(text) -> list[int]`."""

  def __init__(self, encode):
    self._encode = encode

  def encode(self, text: str) -> list[int]:
    return list(self._encode(text))


def _gpt2(path: str):
  import tokenizers  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      path = os.path.join(path, "tokenizer.json")
    else:
      vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
      if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        raise ValueError(f"--vocab=gpt2:{path} has neither tokenizer.json nor vocab.json + "
                         "merges.txt")
      bpe = tokenizers.ByteLevelBPETokenizer(vocab, merges)
      return lambda text: bpe.encode(text).ids
  if not os.path.isfile(path):
    raise ValueError(f"--vocab=gpt2:{path} does not exist (a tokenizer.json, or a directory "
                     "with vocab.json + merges.txt)")
  tokenizer = tokenizers.Tokenizer.from_file(path)
  return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


def make_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer of a vocabulary spec: byte, spm:PATH or gpt2:PATH."""
  kind, arg = config_lib.split_spec(spec, "byte")
  if kind == "byte":
    # errors="ignore", as seqio's encoder: lone surrogates (valid in JSON) are dropped.
    return Tokenizer(lambda text: (b + BYTE_OFFSET
                                           for b in text.encode("utf-8", errors="ignore")))
  if kind == "spm" and arg:
    if not os.path.isfile(arg):
      raise ValueError(f"vocabulary spm:{arg} does not exist (a SentencePiece .model file)")
    import sentencepiece  # pylint: disable=g-import-not-at-top
    processor = sentencepiece.SentencePieceProcessor(model_file=arg)
    return Tokenizer(processor.encode)
  if kind == "gpt2" and arg:
    return Tokenizer(_gpt2(arg))
  raise ValueError(f"vocabulary {spec!r} is invalid: use byte, spm:PATH or gpt2:PATH")


def checked(tokenizer: Tokenizer, vocab_size: int, spec: str) -> Tokenizer:
  """`tokenizer`, raising on an id the model has no embedding for (a vocabulary mismatch would
  otherwise show up only as a NaN loss)."""
  def encode(text):
    ids = tokenizer.encode(text)
    if ids and max(ids) >= vocab_size:
      raise ValueError(f"vocabulary {spec!r} produced token id {max(ids)} but the model has "
                       f"model.vocab_size={vocab_size}: pass the run's vocabulary (--vocab)")
    return ids
  return Tokenizer(encode)
