"""`python -m slw_jax.evaluate --workdir=DIR --task=val|wikitext103|lambada [--data=PATH]`

Zero-shot evaluation of a run's newest (or `--step`) checkpoint, as the paper reports it,
following Megatron-LM's GPT-2 evaluation:
- `wikitext103`: perplexity of the raw test file. The WikiText markup is detokenized, the text
  is scored in windows of the model's context that advance by `--overlap` tokens (each window
  scores only its last `--overlap` targets, so every token is predicted from a long context),
  and both the token-level perplexity and the perplexity adjusted to the original word count
  (`exp(loss * (tokens - 1) / (words - 1))`) are reported.
- `lambada`: last-word accuracy over a JSONL file of {"text": ...}: correct only when every
  token of the final word is the greedy prediction (Megatron's strict evaluation).
- `val`: loss and perplexity over every full-length window of the prepared validation split.
Results go to DIR/eval/<task>.json and are printed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
from absl import flags

from slw_jax import cli, run_log
from slw_jax.errors import UsageError

_TASK = flags.DEFINE_enum("task", None, ["val", "wikitext103", "lambada"], "What to evaluate.")
_DATA = flags.DEFINE_string("data", None, "wikitext103: the raw test file (wiki.test.raw); "
                            "lambada: a JSONL file of {\"text\": ...}; val: a prepared data "
                            "directory (default: the run's data.dir, or the validation "
                            "documents of its megatron: source).")
_VOCAB = flags.DEFINE_string("vocab", None, "byte, spm:PATH or gpt2:PATH (default: the run's "
                             "data.vocab, or the tokenizer of an imported GPT-2).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_OVERLAP = flags.DEFINE_integer("overlap", 32, "wikitext103: targets scored per window (the "
                                "window advances by this many tokens).")


# ----- WikiText -------------------------------------------------------------------------------

_WIKITEXT_RULES = [  # (pattern, replacement, is_regex), in order: the markup of WikiText-103.
    ("s '", "s'", False), (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False), (" @,@ ", ",", False), (" @.@ ", ".", False),
    (" : ", ": ", False), (" ; ", "; ", False), (" . ", ". ", False), (" ! ", "! ", False),
    (" ? ", "? ", False), (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True), (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True), (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False), ("= = =", "===", False), ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False), (" \n", "\n", False), ("\n ", "\n", False),
    (" N ", " 1 ", False), (" 's", "'s", False),
]


def wikitext_detokenize(text: str) -> str:
  """WikiText's tokenized text back to plain text (Megatron-LM's GPT-2 evaluation rules)."""
  for pattern, replacement, is_regex in _WIKITEXT_RULES:
    text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
  return text


def lm_windows(tokens, seq_len: int, overlap: int):
  """(inputs, targets, mask) [N, seq_len]: window i starts at i * overlap; the first scores all
  its targets, each later one only its last `overlap`, so every target is scored exactly once."""
  tokens = np.asarray(tokens, np.int64)
  total_targets = len(tokens) - 1
  count = max(math.ceil((total_targets - seq_len) / overlap) + 1, 1)
  inputs = np.zeros((count, seq_len), np.int32)
  targets = np.zeros((count, seq_len), np.int32)
  mask = np.zeros((count, seq_len), bool)
  for i in range(count):
    chunk = tokens[i * overlap:i * overlap + seq_len + 1]
    n = len(chunk) - 1
    inputs[i, :n], targets[i, :n], mask[i, :n] = chunk[:-1], chunk[1:], True
    if i > 0:
      mask[i, :seq_len - overlap] = False
  return inputs, targets, mask


def wikitext_result(total_loss: float, num_tokens: int, num_words: int) -> dict:
  """Megatron's figures: loss per target token, its perplexity, and the perplexity adjusted to
  the original whitespace-separated word count."""
  loss = total_loss / (num_tokens - 1)
  ratio = (num_tokens - 1) / (num_words - 1)
  capped_exp = lambda x: math.exp(min(20.0, x)) if math.isfinite(x) else math.nan  # noqa: E731
  return {"loss": loss, "ppl": capped_exp(loss), "adjusted_ppl": capped_exp(loss * ratio),
          "tokens": num_tokens, "original_words": num_words, "token_ratio": ratio}


def wikitext103(path: str, tokenizer, scorer, seq_len: int, overlap: int) -> dict:
  with open(path, encoding="utf-8") as f:
    raw = f.read()
  tokens = tokenizer.encode(wikitext_detokenize(raw))
  num_words = len(raw.strip().split(" "))
  if len(tokens) < 2 or num_words < 2:
    raise UsageError(f"--data={path} has fewer than two tokens or words: nothing to score")
  inputs, targets, mask = lm_windows(tokens, seq_len, overlap)
  nll, _ = scorer(inputs, targets)
  return wikitext_result(float((nll * mask).sum()), len(tokens), num_words)


# ----- LAMBADA --------------------------------------------------------------------------------

def lambada_example(text: str, tokenizer, seq_len: int):
  """(inputs, targets, mask) of one example: the mask covers the final word's tokens.

  Raises ValueError for a text without a context before its last word.
  """
  words = text.split() if isinstance(text, str) else []
  if len(words) < 2:
    raise UsageError(f"needs a string \"text\" with at least two words, got {text!r:.60}")
  text = text.strip()
  last = words[-1]
  start = text.rfind(last)
  context, word = tokenizer.encode(text[:start].strip()), tokenizer.encode(" " + last)
  sequence = (context + word)[-(seq_len + 1):]
  n = len(sequence) - 1
  inputs, targets = np.zeros(seq_len, np.int32), np.zeros(seq_len, np.int32)
  mask = np.zeros(seq_len, bool)
  inputs[:n], targets[:n] = sequence[:-1], sequence[1:]
  mask[max(0, n - len(word)):n] = True
  return inputs, targets, mask


def lambada(path: str, tokenizer, scorer, seq_len: int) -> dict:
  examples = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          examples.append(lambada_example(json.loads(line)["text"], tokenizer, seq_len))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
          raise UsageError(f"--data={path}:{number} is not a LAMBADA example (a JSON object "
                           f"with a \"text\" of two or more words): {error}") from None
  if not examples:
    raise UsageError(f"--data={path} has no examples")
  inputs, targets, mask = (np.stack(x) for x in zip(*examples))
  _, argmax = scorer(inputs, targets)
  correct = ((argmax == targets) | ~mask).all(axis=1)
  return {"accuracy": float(correct.mean()), "correct": int(correct.sum()),
          "examples": len(examples)}


# ----- the model ------------------------------------------------------------------------------

def make_scorer(graphdef, params, batch_size: int):
  """(inputs, targets) [N, L] -> (per-token negative log-likelihood, greedy prediction)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from slw_jax import train_step  # pylint: disable=g-import-not-at-top

  @jax.jit
  def score(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs, deterministic=True)
    return train_step.token_losses(logits, targets), jnp.argmax(logits, axis=-1)

  def scorer(inputs, targets):
    count = len(inputs)
    padded = -(-count // batch_size) * batch_size  # Whole batches: one compiled shape.
    inputs = np.concatenate([inputs, np.zeros((padded - count,) + inputs.shape[1:], np.int32)])
    targets = np.concatenate([targets, np.zeros_like(inputs[:padded - count])])
    # Every batch is dispatched before any result is read: one transfer, no per-batch wait.
    outs = jax.device_get([score(params, inputs[i:i + batch_size], targets[i:i + batch_size])
                           for i in range(0, padded, batch_size)])
    return (np.concatenate([o[0] for o in outs])[:count],
            np.concatenate([o[1] for o in outs])[:count])
  return scorer


VAL_BATCHES_IN_FLIGHT = 2  # Dispatched ahead of the one being read back.


def validation(c, data_dir: str | None, graphdef, params, batch_size: int) -> dict:
  """Loss and perplexity over every full-length window of the validation split, streamed:
  `batch_size` windows at a time are read from the memory-mapped split and reduced to a loss
  sum on the device, so memory is set by the batch, never by the split. The last batch's rows
  past the split's end are masked out (padded targets)."""
  import collections  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from slw_jax import input_pipeline, staging, train_step  # pylint: disable=g-import-not-at-top
  if data_dir is None and input_pipeline.is_megatron(c.data):
    tokens = input_pipeline.open_megatron(c.data)[1]["validation"]
  else:
    # A data.dir URL is staged to local disk first (a local one is returned as it is).
    tokens = input_pipeline.open_split(data_dir or staging.stage(c.data), "validation",
                                       c.data.verify_max_bytes)
  index = input_pipeline.WindowIndex(tokens, c.pacing.seqlen_end, c.seed, "validation")
  loss_sum = jax.jit(train_step.make_eval_step(graphdef))
  sums, pending = [], collections.deque()
  for number in range(-(-index.num_windows // batch_size)):
    batch = input_pipeline.validation_batch(index, number, batch_size)  # The trainer's windows.
    targets = batch.targets.copy()
    targets[index.num_windows - number * batch_size:] = train_step.PAD_TARGET  # Wrapped rows.
    pending.append(loss_sum(params, {"inputs": batch.inputs, "targets": targets}))
    if len(pending) > VAL_BATCHES_IN_FLIGHT:
      sums.append(jax.device_get(pending.popleft()))
  sums += jax.device_get(list(pending))
  total, count = (sum(float(part[i]) for part in sums) for i in (0, 1))
  loss = total / count
  return {"loss": loss, "ppl": run_log.perplexity(loss), "windows": index.num_windows,
          "tokens": int(count)}


def run(workdir: str, task: str, data: str | None, vocab: str | None, step: int | None,
        batch_size: int, overlap: int, mirror_dir: str | None = None) -> dict:
  """Scores `task` with checkpoint `step` (default: the newest) of `workdir` (a URL: read
  through a local mirror, the result written back); the result is also WORKDIR/eval/TASK.json."""
  from slw_jax import checkpoint, remote_run, tokenizers_lib  # pylint: disable=g-import-not-at-top
  if task != "val" and not data:
    raise UsageError(f"--task={task} needs --data=PATH (see --help)")
  if data and not os.path.exists(data):
    raise UsageError(f"--data={data} does not exist")
  if batch_size < 1 or overlap < 1:
    raise UsageError(f"--batch_size={batch_size} and --overlap={overlap} must be >= 1")
  run_dir = remote_run.open_for_reading(workdir, mirror_dir, "newest" if step is None else step)
  loaded = checkpoint.load_params(run_dir.local, step)
  c, step = loaded.config, loaded.step
  if overlap > c.model.max_seqlen:
    raise UsageError(f"--overlap={overlap} must be <= model.max_seqlen={c.model.max_seqlen}")
  scorer = make_scorer(loaded.graphdef, loaded.params, batch_size)
  if task == "val":
    if checkpoint.reads_other_ids(loaded.vocab, c.data.vocab):
      raise UsageError(f"--task=val scores data prepared with data.vocab={c.data.vocab!r}, but "
                       f"this model reads {loaded.vocab}: use --task=wikitext103 or lambada")
    result = validation(c, data, loaded.graphdef, loaded.params, batch_size)
  else:
    vocab = vocab or loaded.vocab
    if vocab is None:
      raise UsageError(f"--vocab is required: {workdir} holds a model imported from "
                       f"{loaded.meta.get('imported_from')} without tokenizer files "
                       "(pass --vocab=gpt2:PATH, spm:PATH or byte)")
    tokenizer = tokenizers_lib.checked(tokenizers_lib.make_tokenizer(vocab), c.model.vocab_size,
                                       vocab)
    if task == "wikitext103":
      result = wikitext103(data, tokenizer, scorer, c.model.max_seqlen, overlap)
    else:
      result = lambada(data, tokenizer, scorer, c.model.max_seqlen)
  result = {"task": task, "step": step, "data": data, **result}
  os.makedirs(os.path.join(run_dir.local, "eval"), exist_ok=True)
  run_log.write_json(os.path.join(run_dir.local, "eval", f"{task}.json"), result)
  run_dir.upload(f"eval/{task}.json")
  return result


EXAMPLE = "python -m slw_jax.evaluate --workdir=runs/tiny --task=val"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.WORKDIR, cli.STEP, cli.MIRROR_DIR))
  with cli.exit_on_bad_input():
    cli.parse_flags(argv)
    if not cli.WORKDIR.value or not _TASK.value:
      raise UsageError("--workdir and --task are required, e.g. --workdir=runs/tiny "
                       "--task=val")
    result = run(cli.WORKDIR.value, _TASK.value, _DATA.value, _VOCAB.value, cli.STEP.value,
                 _BATCH.value, _OVERLAP.value, cli.MIRROR_DIR.value)
  print(json.dumps(result, indent=1))
  print(f"written to {cli.WORKDIR.value.rstrip('/')}/eval/{_TASK.value}.json")


if __name__ == "__main__":
  main()
