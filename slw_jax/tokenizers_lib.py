"""Text -> token ids without TensorFlow: the one tokenizer code of prepare, evaluate and convert.

- `byte`: seqio's ByteVocabulary (UTF-8 bytes shifted by 3: pad 0, eos 1, unk 2).
- `spm:PATH`: a SentencePiece model, ids as in the model (seqio uses them unchanged).
- `gpt2:PATH`: GPT-2's byte-level BPE, from a `tokenizer.json` or a directory holding either
  `tokenizer.json` or `vocab.json` + `merges.txt` (the `tokenizers` package; no download). Its
  end of document is `<|endoftext|>` (50256 in GPT-2's own vocabulary).

For byte and spm the ids equal seqio's vocabularies' (tests/test_prepare.py checks both), so
data prepared before this module took over tokenization stays valid.
"""

from __future__ import annotations

import os

import numpy as np

from slw_jax import data_spec, errors


class TokenizerError(errors.InputError):
  """A `data.vocab` that names no usable tokenizer, or one that does not fit the model."""


BYTE_OFFSET = 3  # seqio.ByteVocabulary: ids 0-2 are pad, eos, unk.
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET
GPT2_EOS = "<|endoftext|>"


class Tokenizer:
  """`encode(text) -> list[int]`, and the vocabulary's size and end-of-document id."""

  def __init__(self, encode, vocab_size: int, eos_id: int | None, pad_id: int | None,
               encode_many=None):
    self._encode = encode
    self._encode_many = encode_many or (lambda texts: [encode(t) for t in texts])
    self.vocab_size, self.eos_id, self.pad_id = vocab_size, eos_id, pad_id

  def encode(self, text: str) -> list[int]:
    return list(self._encode(text))

  def encode_documents(self, texts: list[str], dtype: str) -> tuple[bytes, int]:
    """(token bytes, token count) of `texts`, each followed by the end-of-document id, as
    `dtype` in native byte order (the prepared token file's layout)."""
    parts = []
    eos = np.array([self.eos_id], dtype)
    for ids in self._encode_many(texts):
      parts += [np.asarray(ids, dtype), eos]
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return joined.tobytes(), len(joined)


def _bytes_tokenizer() -> Tokenizer:
  def encode(text):
    # errors="ignore", as seqio's encoder: lone surrogates (valid in JSON) are dropped.
    return np.frombuffer(text.encode("utf-8", errors="ignore"), np.uint8).astype(
        np.int32) + BYTE_OFFSET
  return Tokenizer(encode, BYTE_VOCAB_SIZE, eos_id=1, pad_id=0)


def _spm_tokenizer(path: str) -> Tokenizer:
  if not os.path.isfile(path):
    raise TokenizerError(f"vocabulary spm:{path} does not exist (a SentencePiece .model file)")
  import sentencepiece  # pylint: disable=g-import-not-at-top
  try:
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as error:
    raise TokenizerError(f"vocabulary spm:{path} is not a SentencePiece model "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                     ) from None
  # One thread per batch: parallelism comes from prepare's worker processes.
  many = lambda texts: processor.encode(texts, num_threads=1)  # noqa: E731
  return Tokenizer(processor.encode, processor.get_piece_size(), processor.eos_id(),
                   processor.pad_id(), encode_many=many)


def _gpt2_file(path: str) -> str | tuple[str, str]:
  """The tokenizer.json, or (vocab.json, merges.txt), that `gpt2:PATH` names."""
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return os.path.join(path, "tokenizer.json")
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
      raise TokenizerError(f"vocabulary gpt2:{path} has neither tokenizer.json nor vocab.json + "
                           "merges.txt")
    return vocab, merges
  if not os.path.isfile(path):
    raise TokenizerError(f"vocabulary gpt2:{path} does not exist (a tokenizer.json, or a directory "
                         "with vocab.json + merges.txt)")
  return path


def _gpt2_tokenizer(path: str) -> Tokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  source = _gpt2_file(path)
  shown = source if isinstance(source, str) else " + ".join(source)
  try:
    if isinstance(source, str):
      bpe = tokenizers.Tokenizer.from_file(source)
    else:
      bpe = tokenizers.ByteLevelBPETokenizer(*source)
  except (KeyboardInterrupt, SystemExit):
    raise
  except BaseException as error:  # pylint: disable=broad-except
    # tokenizers raises Rust-side exception types (a PanicException is a BaseException).
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise TokenizerError(f"vocabulary gpt2:{path} is not a readable GPT-2 tokenizer ({shown}: "
                         f"{reason})") from None
  eos_id = bpe.token_to_id(GPT2_EOS)  # None: usable to evaluate, not to prepare data.
  encode = lambda text: bpe.encode(text, add_special_tokens=False).ids  # noqa: E731
  many = lambda texts: [e.ids for e in bpe.encode_batch(texts, add_special_tokens=False)]  # noqa
  return Tokenizer(encode, bpe.get_vocab_size(with_added_tokens=True), eos_id, None, many)


def make_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer of a vocabulary spec: byte, spm:PATH or gpt2:PATH (ValueError naming the
  spec and the problem otherwise)."""
  kind, arg = data_spec.split_spec(spec, "byte")
  if kind == "byte":
    return _bytes_tokenizer()
  if kind == "spm" and arg:
    return _spm_tokenizer(arg)
  if kind == "gpt2" and arg:
    return _gpt2_tokenizer(arg)
  raise TokenizerError(f"vocabulary {spec!r} is invalid: use byte, spm:PATH or gpt2:PATH")


def vocab_files(spec: str) -> list[str]:
  """The files a vocabulary spec reads (hashed into the prepared data's recipe)."""
  kind, arg = data_spec.split_spec(spec, "byte")
  if kind == "spm":
    return [arg]
  if kind == "gpt2":
    source = _gpt2_file(arg)
    return [source] if isinstance(source, str) else list(source)
  return []


def checked(tokenizer: Tokenizer, vocab_size: int, spec: str) -> Tokenizer:
  """`tokenizer`, raising on an id the model has no embedding for (a vocabulary mismatch would
  otherwise show up only as a NaN loss)."""
  def encode(text):
    ids = tokenizer.encode(text)
    if ids and max(ids) >= vocab_size:
      raise TokenizerError(f"vocabulary {spec!r} produced token id {max(ids)} but the model has "
                           f"model.vocab_size={vocab_size}: pass the run's vocabulary (--vocab)")
    return ids
  return Tokenizer(encode, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)

