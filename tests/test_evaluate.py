"""Zero-shot evaluation: WikiText detokenizer and perplexity arithmetic, strict LAMBADA, and the
command on a trained tiny run."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from slw_jax import evaluate, tokenizers_lib, trainer

BYTES = tokenizers_lib.make_tokenizer("byte")


@pytest.mark.parametrize("raw,plain", [
    ("the 1 @,@ 000 @-@ year old . It", "the 1,000-year old. It"),
    (" = = Early life = = \n", " == Early life ==\n"),
    ("he said \" yes \" ( twice ) , then left ; ok", 'he said "yes" (twice), then left; ok'),
    ("the city 's walls : 3 @.@ 5 m", "the city's walls: 3.5 m"),
])
def test_wikitext_detokenizer(raw, plain):
  assert evaluate.wikitext_detokenize(raw) == plain


def test_windows_score_every_target_once():
  tokens = np.arange(100)
  inputs, targets, mask = evaluate.lm_windows(tokens, seq_len=16, overlap=4)
  np.testing.assert_array_equal(targets[mask], tokens[1:])
  np.testing.assert_array_equal(inputs[mask], tokens[:-1])
  assert mask[0].all() and mask[1].sum() == 4  # Later windows score their last 4 targets.


def test_wikitext_perplexities(tmp_path):
  raw = " = Title = \n the 2 @,@ 000 cats sat . \n"
  path = tmp_path / "wiki.test.raw"
  path.write_text(raw)
  constant = lambda inputs, targets: (np.ones(inputs.shape), targets)  # nll 1 per token.  # noqa
  result = evaluate.wikitext103(str(path), BYTES, constant, seq_len=8, overlap=2)
  # By hand: the detokenized text " = Title =\nthe 2,000 cats sat.\n" is 31 bytes; the raw
  # file has 11 space-separated words ("=", "Title", "=", "\n", "the", "2", "@,@", "000",
  # "cats", "sat", "."). Loss 1 per target: ppl e, adjusted exp(30 / 10) = e^3.
  assert result["tokens"] == 31 and result["original_words"] == 11
  assert result["loss"] == pytest.approx(1.0) and result["ppl"] == pytest.approx(math.e)
  assert result["token_ratio"] == 3.0 and result["adjusted_ppl"] == pytest.approx(math.e ** 3)
  nan = evaluate.wikitext_result(math.nan, 31, 11)
  assert math.isnan(nan["ppl"]) and math.isnan(nan["adjusted_ppl"])  # Not a capped e^20.


def test_lambada_is_strict_about_the_last_word_only(tmp_path):
  path = tmp_path / "lambada.jsonl"
  texts = ["the cat sat on the mat", "a dog ran far", "birds can fly high"]
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

  def scorer(inputs, targets):  # Right everywhere, except two deliberate mistakes.
    argmax = targets.copy()
    argmax[1, _last_word(texts[1])[-1]] += 1  # Last token of example 1's last word: wrong.
    argmax[2, 0] += 1  # A context position of example 2: does not count.
    return np.zeros(inputs.shape), argmax

  result = evaluate.lambada(str(path), BYTES, scorer, seq_len=32)
  assert result == {"accuracy": pytest.approx(2 / 3), "correct": 2, "examples": 3}


def _last_word(text):
  """Target positions of the final word in lambada_example's layout."""
  _, _, mask = evaluate.lambada_example(text, BYTES, 32)
  return np.flatnonzero(mask)


def test_lambada_bad_examples_are_clear_errors(tmp_path):
  path = tmp_path / "lambada.jsonl"
  path.write_text(json.dumps({"text": "fine example here"}) + "\n" + json.dumps({"text": "one"}))
  with pytest.raises(ValueError, match=r"lambada.jsonl:2 is not a LAMBADA example"):
    evaluate.lambada(str(path), BYTES, None, seq_len=32)
  big = tokenizers_lib.checked(BYTES, vocab_size=100, spec="byte")
  with pytest.raises(ValueError, match="produced token id 119 but the model has "
                                       "model.vocab_size=100"):
    big.encode("abt")


def test_lambada_example_layout():
  inputs, targets, mask = evaluate.lambada_example("the cat sat", BYTES, 32)
  assert bytes(int(t) - 3 for t in targets[mask]) == b" sat"
  inputs, targets, mask = evaluate.lambada_example("x" * 50 + " end", BYTES, 16)  # Truncated.
  assert bytes(int(t) - 3 for t in targets[mask]) == b" end" and mask[-4:].all()


@pytest.mark.slow
def test_evaluate_a_trained_run(make_config, tmp_path):
  workdir = str(tmp_path / "run")
  trainer.Trainer(make_config(train_steps=4, checkpoint__every_steps=2), workdir).run()
  val = evaluate.run(workdir, "val", None, None, None, batch_size=4, overlap=8)
  assert val["step"] == 4 and val["windows"] >= 1
  assert math.isfinite(val["loss"]) and 0 < val["loss"] < 10
  assert val["ppl"] == pytest.approx(math.exp(val["loss"]))
  assert json.load(open(tmp_path / "run" / "eval" / "val.json"))["loss"] == val["loss"]
  raw = tmp_path / "wiki.raw"
  raw.write_text(" = Title = \n some text , here @-@ and there . \n" * 5)
  wiki = evaluate.run(workdir, "wikitext103", str(raw), None, 2, batch_size=4, overlap=8)
  assert wiki["step"] == 2 and 1 < wiki["ppl"] < 1e4
  lam = tmp_path / "lambada.jsonl"
  lam.write_text(json.dumps({"text": "one two three"}) + "\n")
  assert 0 <= evaluate.run(workdir, "lambada", str(lam), "byte", None, 4, 8)["accuracy"] <= 1
  result = subprocess.run([sys.executable, "-m", "slw_jax.evaluate", f"--workdir={workdir}",
                           "--task=lambada"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --task=lambada needs --data=PATH (see --help)"


def test_gpt2_bpe_from_local_files(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(["the cat sat on the mat"] * 20, vocab_size=300, min_frequency=1)
  bpe.save_model(str(tmp_path))  # vocab.json + merges.txt, as GPT-2 ships them.
  bpe.save(str(tmp_path / "single.json"))
  expected = bpe.encode(" the cat").ids
  assert tokenizers_lib.make_tokenizer(f"gpt2:{tmp_path}").encode(" the cat") == expected
  assert tokenizers_lib.make_tokenizer(f"gpt2:{tmp_path / 'single.json'}").encode(
      " the cat") == expected
  with pytest.raises(ValueError, match="has neither tokenizer.json nor vocab.json"):
    tokenizers_lib.make_tokenizer(f"gpt2:{REPO}")  # A directory without tokenizer files.
  with pytest.raises(ValueError, match="use byte, spm:PATH or gpt2:PATH"):
    tokenizers_lib.make_tokenizer("bpe:x")
  with pytest.raises(ValueError, match="spm:/nonexistent.model does not exist"):
    tokenizers_lib.make_tokenizer("spm:/nonexistent.model")


@pytest.mark.slow
def test_validation_streams_a_split_larger_than_its_batch(make_config, tmp_path, monkeypatch):
  """--task=val reads batch_size windows at a time (never the whole split) and gives the loss
  of scoring every window at once; the last, partial batch counts only its real windows."""
  from slw_jax import checkpoint, input_pipeline  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  trainer.Trainer(make_config(train_steps=3, checkpoint__every_steps=3), workdir).run()
  loaded = checkpoint.load_params(workdir)
  c = loaded.config
  tokens = input_pipeline.open_split(c.data.dir, "validation")
  index = input_pipeline.WindowIndex(tokens, c.pacing.seqlen_end, c.seed, "validation")
  assert index.num_windows > 7 and index.num_windows % 3  # Several batches, the last partial.
  every = input_pipeline.validation_batch(index, 0, index.num_windows)
  nll, _ = evaluate.make_scorer(loaded.graphdef, loaded.params, index.num_windows)(
      every.inputs, every.targets)
  rows, real = [], input_pipeline.validation_batch
  monkeypatch.setattr(input_pipeline, "validation_batch",
                      lambda *a, **k: rows.append(len(real(*a, **k).inputs)) or real(*a, **k))
  streamed = evaluate.run(workdir, "val", None, None, None, batch_size=3, overlap=8)
  assert max(rows) == 3 and len(rows) == -(-index.num_windows // 3)
  assert streamed["tokens"] == nll.size and streamed["windows"] == index.num_windows
  assert streamed["loss"] == pytest.approx(float(nll.mean()), rel=1e-5)
