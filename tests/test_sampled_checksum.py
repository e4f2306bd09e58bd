"""The sampled checksum of a split's tokens (`resume.split_fingerprint`), kept in every
checkpoint so that a resume on other token files is refused: one token changed where it samples
changes it, anywhere along the split; the same tokens give the same fingerprint however they are
held; and a Megatron pair, which has no full checksum of its own (nothing prepared it), is
refused at a resume once its tokens changed."""

import struct

import numpy as np
import pytest

from slw_jax import input_pipeline, megatron_data, resume


def _sampled_runs(num_tokens: int) -> np.ndarray:
  """The first token of each sampled run, as documented: SAMPLES evenly spaced runs of
  SAMPLE_TOKENS tokens from the first token to the last."""
  last_start = max(num_tokens - resume.SAMPLE_TOKENS, 0)
  return np.linspace(0, last_start, resume.SAMPLES).astype(np.int64)


def _sampled_positions(num_tokens: int) -> dict[str, int]:
  """Positions inside sampled runs: the split's ends and runs along its length."""
  starts = _sampled_runs(num_tokens)
  return {"first token": 0, "last token": num_tokens - 1, "a middle run's start":
          int(starts[resume.SAMPLES // 2]), "inside the 10th run": int(starts[9]) + 1000,
          "the last run's start": int(starts[-1])}


# 2.5 M tokens: the 64 runs of 4096 cover a tenth of it (the cheap checksum of a large split).
NUM_TOKENS = 2_500_000


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 50_000, NUM_TOKENS).astype(np.uint16)


def _changed(tokens_, position):
  changed = tokens_.copy()
  changed[position] = (int(changed[position]) + 1) % 50_000
  return changed


@pytest.mark.parametrize("where", sorted(_sampled_positions(NUM_TOKENS)))
def test_one_token_changed_where_sampled_changes_the_fingerprint(tokens, where):
  """A checksum of nothing, or of the first run only, would miss these."""
  position = _sampled_positions(NUM_TOKENS)[where]
  before = resume.split_fingerprint(tokens)
  after = resume.split_fingerprint(_changed(tokens, position))
  assert after["tokens"] == before["tokens"] == NUM_TOKENS
  assert after["sample_sha256"] != before["sample_sha256"]


def test_a_split_shorter_than_one_run_is_checked_whole():
  short = np.arange(1000, dtype=np.uint16)
  before = resume.split_fingerprint(short)["sample_sha256"]
  for position in (0, 500, 999):
    assert resume.split_fingerprint(_changed(short, position))["sample_sha256"] != before


def test_the_same_tokens_give_the_same_fingerprint_however_held(tokens, tmp_path):
  path = tmp_path / "tokens.bin"
  tokens.tofile(path)
  mapped = np.memmap(path, dtype=np.uint16, mode="r")
  fingerprint = resume.split_fingerprint(tokens, "abc")
  assert resume.split_fingerprint(tokens.copy(), "abc") == fingerprint
  assert resume.split_fingerprint(mapped, "abc") == fingerprint
  assert fingerprint["sha256"] == "abc" and fingerprint["dtype"] == "uint16"
  assert "sha256" not in resume.split_fingerprint(tokens)  # None recorded: none kept.
  assert resume.split_fingerprint(tokens.astype(np.int32)) != resume.split_fingerprint(tokens)


def _write_megatron_pair(prefix, documents):
  """PREFIX.bin and PREFIX.idx in Megatron's layout (see slw_jax.megatron_data), uint16 ids,
  one sequence per document."""
  lengths = np.array([len(d) for d in documents], np.int32)
  pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * 2]).astype(np.int64)
  with open(f"{prefix}.bin", "wb") as f:
    for document in documents:
      f.write(np.asarray(document, np.uint16).tobytes())
  with open(f"{prefix}.idx", "wb") as f:
    f.write(megatron_data.MAGIC + struct.pack("<QBQQ", 1, 8, len(documents), len(documents) + 1))
    f.write(lengths.tobytes() + pointers.tobytes())
    f.write(np.arange(len(documents) + 1, dtype=np.int64).tobytes())


def _overwrite_token(prefix, position):
  """Changes the id at token `position` of PREFIX.bin in place (another valid byte id)."""
  with open(f"{prefix}.bin", "r+b") as f:
    f.seek(2 * position)
    old = np.frombuffer(f.read(2), np.uint16)[0]
    f.seek(2 * position)
    f.write(np.uint16((int(old) + 1) % 256).tobytes())


def test_a_megatron_pair_whose_tokens_changed_is_refused_at_a_resume(make_config, tmp_path):
  """The fingerprint a checkpoint keeps of a `megatron:PREFIX` source (its splits: memory-maps
  of the .bin) against the same pair after one token of each split changed in place, as
  a resume checks it: same size, so only the sampled checksum can tell."""
  rng = np.random.default_rng(1)
  documents = [rng.integers(0, 256, 20_000) for _ in range(20)]  # 400,000 tokens.
  prefix = str(tmp_path / "mega")
  _write_megatron_pair(prefix, documents)
  c = make_config(data__source=f"megatron:{prefix}", data__vocab="byte",
                  data__dir=str(tmp_path / "never"))

  def fingerprint():
    loader, validation = input_pipeline.open_training_data(c, log=lambda *_: None)
    return resume.data_fingerprint(c, loader.index.tokens, validation.tokens)
  saved = fingerprint()
  assert set(saved) == {"train", "validation"} and "sha256" not in saved["train"]
  assert saved["train"]["tokens"] == 18 * 20_000  # Validation: the last 10% of documents.
  resume.check_data(saved, fingerprint(), "checkpoint 12", c.data.source)  # Unchanged: fine.
  train_position = int(_sampled_runs(saved["train"]["tokens"])[40]) + 7
  _overwrite_token(prefix, train_position)
  with pytest.raises(resume.ResumeError, match=r"the 'train' token files of data.dir='megatron:"
                     r".*' changed since checkpoint 12 was saved \(its tokens differ \(sha256\)\)"):
    resume.check_data(saved, fingerprint(), "checkpoint 12", c.data.source)
  saved = fingerprint()  # The pair as it is now, then one validation token changed.
  _overwrite_token(prefix, saved["train"]["tokens"] + 123)
  with pytest.raises(resume.ResumeError, match=r"the 'validation' token files .* changed"):
    resume.check_data(saved, fingerprint(), "checkpoint 12", c.data.source)
