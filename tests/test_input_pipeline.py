"""The numpy loader: determinism, exact restore, process slicing, truncation/reshape, errors."""

import json
import os

import numpy as np
import pytest

from slw_jax import input_pipeline as ip

SEQLEN_END = 32


def _index(num_tokens=32 * 50 + 1, seed=0):
  # Token value == its offset, so every batch can be traced back to where it came from.
  return ip.WindowIndex(np.arange(num_tokens, dtype=np.int64), SEQLEN_END, seed)


def _shapes(steps=12):
  return [(8, 8 * (1 + t % 4)) for t in range(steps)]  # Changing seqlen like a warmup.


def _run(loader, shapes):
  return [loader.next_batch(b, l) for b, l in shapes]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
def test_two_loaders_agree_and_seed_matters(mode):
  _assert_same(_run(ip.Loader(_index(), mode), _shapes()), _run(ip.Loader(_index(), mode),
                                                                _shapes()))
  other = _run(ip.Loader(_index(seed=1), mode), _shapes())
  assert not np.array_equal(other[0].inputs, _run(ip.Loader(_index(), mode), _shapes())[0].inputs)


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
@pytest.mark.parametrize("depth", [0, 3])
def test_restore_continues_exactly(mode, depth):
  shapes = _shapes(20)
  reference = _run(ip.Loader(_index(), mode), shapes)
  first = ip.Loader(_index(), mode)
  consumed = first.prefetch(iter(shapes[:7]), depth)
  _assert_same(list(consumed), reference[:7])
  state = json.loads(json.dumps(first.state()))  # Survives a round trip through a checkpoint.
  resumed = ip.Loader(_index(), mode)
  resumed.restore(state)
  _assert_same(list(resumed.prefetch(iter(shapes[7:]), depth)), reference[7:])


def test_prefetch_state_counts_only_handed_out_batches():
  loader = ip.Loader(_index(), "truncate")
  stream = loader.prefetch(iter(_shapes(10)), depth=4)
  next(stream)
  next(stream)
  assert loader.position == 16  # Two batches of 8 windows, whatever the thread made ahead.
  stream.close()


def test_prefetch_reraises_errors_from_the_thread():
  loader = ip.Loader(_index(), "truncate", process_count=3)
  with pytest.raises(ip.CorpusError, match="not divisible by the process count 3"):
    list(loader.prefetch(iter([(8, 8)]), depth=2))


@pytest.mark.parametrize("mode", ["truncate", "reshape"])
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_cover_the_global_batch_exactly_once(mode, processes):
  for position, (batch_size, seqlen) in [(0, (8, 16)), (37, (16, 24)), (400, (8, 32))]:
    whole = ip.Loader(_index(), mode).batch_at(position, batch_size, seqlen)
    parts = [ip.Loader(_index(), mode, p, processes).batch_at(position, batch_size, seqlen)
             for p in range(processes)]
    assert all(part.inputs.shape == (batch_size // processes, seqlen) for part in parts)
    np.testing.assert_array_equal(np.concatenate([p.inputs for p in parts]), whole.inputs)
    np.testing.assert_array_equal(np.concatenate([p.targets for p in parts]), whole.targets)


def test_truncation_keeps_window_prefixes():
  loader = ip.Loader(_index(), "truncate")
  batch = loader.next_batch(8, 16)
  assert batch.inputs.shape == batch.targets.shape == (8, 16)
  assert batch.inputs.dtype == np.int32
  starts = batch.inputs[:, 0]
  assert np.all(starts % SEQLEN_END == 0)  # Each row is the start of a full window ...
  np.testing.assert_array_equal(batch.inputs, starts[:, None] + np.arange(16))  # ... truncated,
  np.testing.assert_array_equal(batch.targets, batch.inputs + 1)  # with next-token targets.
  full = ip.Loader(_index(), "truncate").next_batch(8, SEQLEN_END)
  np.testing.assert_array_equal(full.inputs[:, :16], batch.inputs)  # Same windows, shorter.


def test_truncate_epoch_uses_every_window_once_then_reshuffles():
  index = _index()
  loader = ip.Loader(index, "truncate")
  epoch0 = np.concatenate([loader.next_batch(10, 8).inputs[:, 0] for _ in range(5)])
  epoch1 = np.concatenate([loader.next_batch(10, 8).inputs[:, 0] for _ in range(5)])
  windows = np.arange(index.num_windows) * SEQLEN_END
  np.testing.assert_array_equal(np.sort(epoch0), windows)
  np.testing.assert_array_equal(np.sort(epoch1), windows)
  assert not np.array_equal(epoch0, epoch1)
  assert loader.state()["epoch"] == 2


def test_reshape_mode_drops_no_token():
  index = _index()
  loader = ip.Loader(index, "reshape")
  seen = []
  consumed = 0
  for seqlen in (8, 16, 8, 24, 32, 32, 16, 8):  # 4 rows per step.
    batch = loader.next_batch(4, seqlen)
    assert batch.inputs.shape == (4, seqlen)
    np.testing.assert_array_equal(batch.targets, batch.inputs + 1)  # True next tokens.
    seen.append(batch.inputs.ravel())
    consumed += 4 * seqlen
  seen = np.concatenate(seen)
  assert loader.position == consumed == len(seen)  # Same tokens per step as truncation.
  assert len(np.unique(seen)) == len(seen)  # No token twice ...
  windows = np.unique(seen // SEQLEN_END)
  assert len(windows) * SEQLEN_END == len(seen)  # ... and whole windows used, none dropped.


def test_batch_is_a_pure_function_of_position():
  loader = ip.Loader(_index(), "truncate")
  _run(loader, _shapes(5))
  fresh = ip.Loader(_index(), "truncate").batch_at(loader.position, 8, 16)
  np.testing.assert_array_equal(loader.next_batch(8, 16).inputs, fresh.inputs)


def test_validation_batches_are_full_length_windows_in_order():
  index = _index()
  batch = ip.validation_batch(index, 0, 4)
  np.testing.assert_array_equal(batch.inputs[:, 0], np.arange(4) * SEQLEN_END)
  assert batch.inputs.shape == (4, SEQLEN_END)
  halves = [ip.validation_batch(index, 1, 4, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h.inputs for h in halves]),
                                ip.validation_batch(index, 1, 4).inputs)


def test_loader_errors():
  with pytest.raises(ip.CorpusError, match="too few for one window of pacing.seqlen_end"):
    ip.WindowIndex(np.arange(SEQLEN_END), SEQLEN_END, 0)
  with pytest.raises(ip.CorpusError, match="smaller than one global batch of 64"):
    ip.Loader(_index()).check_batch_fits(64)
  with pytest.raises(ip.CorpusError, match="batch size 6 is not divisible by the process count 4"):
    ip.Loader(_index(), process_count=4).batch_at(0, 6, 8)
  state = ip.Loader(_index(seed=5)).state()
  with pytest.raises(ip.CorpusError, match="loader seed=5 differs"):
    ip.Loader(_index(seed=0)).restore(state)


def _write_prepared(tmp_path, tokens, **meta_overrides):
  data = np.asarray(tokens, dtype=np.uint16)
  data.tofile(tmp_path / "train.bin")
  data.tofile(tmp_path / "validation.bin")
  info = {"file": "train.bin", "tokens": len(data), "documents": 1,
          "sha256": ip.file_sha256(str(tmp_path / "train.bin"))}
  meta = {"dtype": "uint16", "vocab": "byte", "vocab_size": 259,
          "splits": {"train": info, "validation": dict(info, file="validation.bin")}}
  meta.update(meta_overrides)
  (tmp_path / ip.METADATA).write_text(json.dumps(meta))
  return meta


def test_open_split_checks_size_checksum_and_emptiness(tmp_path):
  _write_prepared(tmp_path, np.arange(100))
  assert len(ip.open_split(str(tmp_path), "train")) == 100
  with open(tmp_path / "train.bin", "r+b") as f:
    f.write(b"\x07\x00")  # Same size, different content.
  with pytest.raises(ip.CorpusError, match="does not match the sha256"):
    ip.open_split(str(tmp_path), "train")
  assert len(ip.open_split(str(tmp_path), "train", verify_max_bytes=10)) == 100  # Size only.
  with open(tmp_path / "train.bin", "ab") as f:
    f.write(b"\x00\x00")
  with pytest.raises(ip.CorpusError, match="has 202 bytes but metadata.json says 100"):
    ip.open_split(str(tmp_path), "train")
  os.remove(tmp_path / "validation.bin")
  with pytest.raises(ip.CorpusError, match="validation.bin is missing"):
    ip.open_split(str(tmp_path), "validation")


def test_open_split_errors_on_empty_and_missing(tmp_path):
  _write_prepared(tmp_path, [])
  with pytest.raises(ip.CorpusError, match="is empty"):
    ip.open_split(str(tmp_path), "train")
  with pytest.raises(ip.CorpusError, match="holds no prepared data"):
    ip.open_split(str(tmp_path / "nothing"), "train")


def test_vocab_larger_than_model_is_an_error(tmp_path):
  meta = _write_prepared(tmp_path, np.arange(100), vocab="spm:big.model", vocab_size=32000)
  with pytest.raises(ip.CorpusError, match="config.model.vocab_size=259 is too small"):
    ip.check_vocab(meta, 259, str(tmp_path))


def test_a_model_of_another_vocabulary_is_refused(tmp_path):
  """GPT-2's 50257 ids on byte data (259) is a paper config without its corpus: refused with
  both sizes; the data's size rounded up to 128 (nanoGPT's 50304 for 50257) is allowed."""
  meta = _write_prepared(tmp_path, np.arange(100), vocab="byte", vocab_size=259)
  with pytest.raises(ip.CorpusError, match=r"config.model.vocab_size=50257 does not match the "
                     r"data in .*: its vocabulary \(byte\) has 259 ids \(allowed: 259 to 384\)"):
    ip.check_vocab(meta, 50257, str(tmp_path))
  ip.check_vocab(meta, 384, str(tmp_path))
  ip.check_vocab(dict(meta, vocab_size=50257, vocab="gpt2:x"), 50304, str(tmp_path))


# ----- the keyed data order ----------------------------------------------------------------------

def _reference_permutation(slot: int, n: int, seed: int, epoch: int) -> int:
  """input_pipeline's documented arithmetic, written again with Python integers only (no
  numpy): the order must not depend on numpy's integer semantics or version."""
  mask64 = (1 << 64) - 1

  def mix(x):
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask64
    return x ^ (x >> 31)
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  base = mix(seed ^ mix(epoch))
  keys = [mix(base + r) for r in range(ip.FEISTEL_ROUNDS)]
  x = slot
  while True:
    left, right = x >> half, x & ((1 << half) - 1)
    for key in keys:
      left, right = right, left ^ (mix(right ^ key) & ((1 << half) - 1))
    x = (left << half) | right
    if x < n:
      return x


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_keyed_permutation_is_a_bijection_matching_its_documented_arithmetic(n):
  slots = np.arange(n)
  order = ip.keyed_permutation(slots, n, seed=7, epoch=3)
  np.testing.assert_array_equal(np.sort(order), slots)
  picked = slots[:: max(1, n // 50)]
  assert [int(v) for v in order[picked]] == [_reference_permutation(int(s), n, 7, 3)
                                             for s in picked]
  if n >= 64:  # Another epoch or seed: another order.
    assert not np.array_equal(order, ip.keyed_permutation(slots, n, seed=7, epoch=4))
    assert not np.array_equal(order, ip.keyed_permutation(slots, n, seed=8, epoch=3))


def test_keyed_permutation_needs_memory_of_the_batch_not_the_corpus():
  """A trillion windows (a numpy permutation would need 8 TB): one batch's slots map to
  distinct windows, in the range, computed in milliseconds."""
  n = 10**12
  slots = np.arange(5 * 10**11, 5 * 10**11 + 512)
  windows = ip.keyed_permutation(slots, n, seed=0, epoch=0)
  assert len(set(windows.tolist())) == 512 and windows.min() >= 0 and windows.max() < n


def test_a_checkpoint_of_the_earlier_data_order_resumes_with_a_note():
  loader = ip.Loader(_index(), "truncate")
  state = loader.state()
  assert state["order"] == ip.DATA_ORDER
  old = {k: v for k, v in state.items() if k != "order"}
  old["position"] = 40
  note = loader.restore(old)
  assert "earlier release's (numpy permutations)" in note and loader.position == 40
  assert loader.restore(state) is None
  with pytest.raises(ip.CorpusError, match="loader order='shuffle-v9' is unknown"):
    loader.restore(dict(state, order="shuffle-v9"))
