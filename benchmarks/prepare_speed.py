"""Preparation speed: `slw_jax.prepare` MB/s per vocabulary with 1 and N workers, next to the
tokenizer libraries' own batch encoding of the same documents (issue 13; target: N=2 workers
at least 1.8x one worker on a 2-core machine).

Corpus: `--megabytes` (64) of distinct real text, the standard library's and then
site-packages' .py files, written as .jsonl (a `files:` source), so that process start-up does
not dominate. Vocabularies (trained on the standard library): `byte`;
`spm:` an 8K unigram SentencePiece trained on it; `gpt2:` a byte-level BPE of GPT-2's size
(50,257 ids with `<|endoftext|>`) trained on it with the `tokenizers` library (nothing is
downloaded: real GPT-2 merges encode at a similar rate). Each prepare runs in a fresh process,
from reading the files to the finished metadata; 1 and N workers alternate `--repeats` times
and the medians are reported (this 2-core VM's speed drifts by up to 40% between runs). The peer figure is the library encoding
texts already in memory with all cores (`tokenizers`' encode_batch, SentencePiece's
num_threads): a ceiling with no reading, hashing or writing.

    .venv/bin/python benchmarks/prepare_speed.py [--workers=2] [--only=byte,spm,gpt2] \
        [--megabytes=64] [--repeats=3]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from slw_jax import config_lib, prepare  # noqa: E402  pylint: disable=g-import-not-at-top


def make_vocabularies(folder: str, texts: list[str]) -> dict[str, str]:
  import tokenizers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=50257, min_frequency=2,
                          special_tokens=["<|endoftext|>"])
  bpe.save(os.path.join(folder, "gpt2.json"))
  c = config_lib.validate(config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py")))
  spm = prepare.train_sentencepiece(c.data, os.path.join(folder, "spm8k.model"), 8192,
                                    log=lambda *_: None)
  return {"byte": "byte", "spm": f"spm:{spm}", "gpt2": f"gpt2:{folder}/gpt2.json"}


def corpus_texts(megabytes: float) -> list[str]:
  """Distinct real text, offline: the standard library's .py files, then site-packages' (no
  file twice: a repeated corpus would let the BPE's word cache flatter the rates)."""
  import sysconfig  # pylint: disable=g-import-not-at-top
  paths = prepare.stdlib_files()
  site = sysconfig.get_paths()["purelib"]
  for folder, subfolders, files in os.walk(site):
    subfolders.sort()
    paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
  texts, total = [], 0
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      texts.append(f.read())
    total += len(texts[-1].encode("utf-8"))
    if total >= megabytes * 2**20:
      break
  return [t for t in texts if t]


def write_corpus(folder: str, texts: list[str]) -> str:
  """The texts as .jsonl files (one document a line, 2,000 a file): a files: source."""
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.join(folder, "corpus"))
  for number in range(0, len(texts), 2000):
    with open(os.path.join(folder, "corpus", f"part{number // 2000:04d}.jsonl"), "w") as f:
      f.writelines(json.dumps({"text": text}) + "\n" for text in texts[number:number + 2000])
  return f"files:{folder}/corpus/*.jsonl"


def timed_prepare(source: str, vocab: str, workers: int, out: str) -> float:
  command = [sys.executable, "-m", "slw_jax.prepare", "--config=configs/tiny.py",
             f"--config.data.source={source}", f"--config.data.vocab={vocab}",
             f"--config.data.dir={out}", f"--workers={workers}", "--force"]
  start = time.perf_counter()
  subprocess.run(command, cwd=REPO, check=True, capture_output=True)
  return time.perf_counter() - start


def peer_seconds(vocab: str, texts: list[str]) -> float:
  """The library's own batch encoding of the in-memory texts, every core."""
  from slw_jax import tokenizers_lib  # pylint: disable=g-import-not-at-top
  os.environ.pop("TOKENIZERS_PARALLELISM", None)
  kind, path = vocab.split(":", 1) if ":" in vocab else (vocab, "")
  start = time.perf_counter()
  if kind == "gpt2":
    import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizers.Tokenizer.from_file(path).encode_batch(texts, add_special_tokens=False)
  elif kind == "spm":
    import sentencepiece  # pylint: disable=g-import-not-at-top
    sentencepiece.SentencePieceProcessor(model_file=path).encode(texts, num_threads=os.cpu_count())
  else:
    tokenizer = tokenizers_lib.make_tokenizer("byte")
    tokenizer.encode_documents(texts, "uint16")
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workers", type=int, default=prepare.default_workers())
  parser.add_argument("--only", default="byte,spm,gpt2")
  parser.add_argument("--megabytes", type=float, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  c = config_lib.validate(config_lib.load_config_file(os.path.join(REPO, "configs/tiny.py")))
  texts = corpus_texts(args.megabytes)
  with tempfile.TemporaryDirectory() as folder:
    vocabs = make_vocabularies(folder, texts[:len(prepare.stdlib_files())])
    source = write_corpus(folder, texts)
    megabytes = prepare.source_bytes(config_lib.with_overrides(c, {"data.source": source}).data)
    megabytes /= 2**20
    print(f"corpus: stdlib + site-packages .py files, {len(texts)} documents, "
          f"{megabytes:.1f} MB of .jsonl; {os.cpu_count()} cores")
    print(f"| vocab | 1 worker MB/s | {args.workers} workers MB/s | speedup | "
          "library batch encode MB/s (all cores, in memory) |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.only.split(","):
      ones, manys = [], []
      for _ in range(args.repeats):  # Alternating, medians: this machine's speed drifts.
        ones.append(timed_prepare(source, vocabs[name], 1, os.path.join(folder, f"{name}1")))
        manys.append(timed_prepare(source, vocabs[name], args.workers,
                                   os.path.join(folder, f"{name}n")))
      one, many = statistics.median(ones), statistics.median(manys)
      peer = peer_seconds(vocabs[name], texts)
      same = all(open(os.path.join(folder, f"{name}1", f), "rb").read() ==
                 open(os.path.join(folder, f"{name}n", f), "rb").read()
                 for f in ("train.bin", "validation.bin"))
      print(f"| {name} | {megabytes / one:.2f} | {megabytes / many:.2f} | {one / many:.2f}x"
            f"{'' if same else ' (BYTES DIFFER)'} | {megabytes / peer:.2f} |", flush=True)


if __name__ == "__main__":
  main()
