"""What a resumed run may change, and the journal that makes a rollback survive a crash.

A run resumes from its newest checkpoint under the config it is started with. Some fields may
differ from the saved config and are only logged (evaluation, logging, compile and checkpoint
settings, the mesh, the attention kernel, microbatches); fields of the training recipe (batch
size, token budget, pacing, optimizer, seed, data order) change the learning-rate curve or the
data a step sees, so they are refused unless the user accepts them knowingly
(--allow_schedule_change); the model's shape never changes. The tokens are compared rather
than `data.*` strings (a path may be spelled many ways, data may move): every checkpoint holds
each split's size, checksum and a sampled checksum (`split_fingerprint`); a model imported
with its own tokenizer is checked against the data's vocabulary kind by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from slw_jax import checkpoint, config_lib, input_pipeline, reporting


class ResumeError(ValueError):
  """The workdir's checkpoints cannot be continued with this config or data (one line)."""


# Changes a resume accepts and logs: none of them alters the recipe (the optimizer, the data, the
# schedules); some change how a step computes it (kernels, precision, remat, the fused head) or
# which dropout masks it draws (model.dropout_rng: other masks of the same rate).
ALLOWED_GROUPS = ("eval", "log", "compile", "checkpoint", "monitor", "hardware", "mesh", "tune",
                  "distributed")
ALLOWED_FIELDS = ("data.dir", "data.source", "data.vocab", "data.prefetch",
                  "data.verify_max_bytes", "data.tfds_data_dir", "model.attention",
                  "model.attention_block", "model.remat", "model.scan_layers", "model.dtype",
                  "model.loss_head", "model.loss_chunk_tokens", "model.dropout_rng",
                  "optim.microbatches")
SHOWN = 3  # Schedule changes named in the error line (then "and N more").


def classify(field: str, param_shaping: tuple[str, ...]) -> str:
  """"allowed", "never" (the parameters' shapes) or "schedule" (any other field: the recipe
  of the run, so that a field added later is refused until classified)."""
  if field.split(".")[0] in ALLOWED_GROUPS or field in ALLOWED_FIELDS:
    return "allowed"
  if field in {f"model.{name}" for name in param_shaping}:
    return "never"
  return "schedule"


def check_config(saved: dict, current: dict, param_shaping: tuple[str, ...], where: str,
                 allow_schedule_change: bool) -> tuple[list[str], list[str]]:
  """(allowed changes, accepted schedule changes) as "a.b=X there, Y here" lines.

  Raises ResumeError naming the first field that may not change: a model shape or vocabulary
  field always, a schedule field unless `allow_schedule_change`. `where` names the checkpoint.
  """
  found = {"allowed": [], "never": [], "schedule": []}
  for difference in config_lib.differences(saved, current):
    found[classify(difference[0], param_shaping)].append(
        config_lib.describe_difference(difference))
  if found["never"]:
    raise ResumeError(f"{where} holds checkpoints of another model ({found['never'][0]}): use "
                      "a new --workdir or the same model config")
  if found["schedule"] and not allow_schedule_change:
    more = len(found["schedule"]) - SHOWN
    listed = "; ".join(found["schedule"][:SHOWN]) + (f"; and {more} more" if more > 0 else "")
    raise ResumeError(
        f"{where} was trained with another recipe, which would change the learning-rate curve "
        "or the data order: resume with the saved values, or pass --allow_schedule_change to "
        f"accept the change knowingly ({listed})")
  return found["allowed"], found["schedule"]


def check_checkpoint(meta: dict, c, workdir: str, num_steps: int, fingerprint: dict,
                     param_shaping: tuple[str, ...], allow_schedule_change: bool):
  """`check_config` and `check_data` of a checkpoint's record (`meta`) against this run's
  config `c` and data `fingerprint`; also refuses a checkpoint past the config's last step,
  or whose model reads other token ids than this run's data (a GPT-2 imported with its own
  tokenizer). Returns check_config's changes."""
  where = f"--workdir={workdir}"
  if meta["step"] > num_steps:
    raise ResumeError(f"{where} holds checkpoint {meta['step']}, past this config's last step "
                      f"{num_steps}: its train_tokens / train_steps end earlier than the run "
                      "already went")
  changes = check_config(config_lib.saved_defaults(meta["config"]), c.to_dict(), param_shaping,
                         where, allow_schedule_change)
  check_data(meta.get("data"), fingerprint, f"checkpoint {meta['step']}",
             c.data.dir or c.data.source)
  recorded = checkpoint.model_vocab(meta, c.data.vocab, workdir)
  if checkpoint.reads_other_ids(recorded, c.data.vocab):
    raise ResumeError(f"{where} holds a model imported with the tokenizer {recorded} but "
                      f"config.data.vocab={c.data.vocab!r}: training would feed it other token "
                      f"ids (train on data prepared with --config.data.vocab={recorded})")
  return changes


def data_fingerprint(c, train_tokens: np.ndarray, validation_tokens: np.ndarray) -> dict:
  """{split: split_fingerprint} of a run's data, with the sha256 preparation recorded."""
  sums = {} if input_pipeline.is_megatron(c.data) else input_pipeline.read_metadata(
      c.data.dir)["splits"]
  return {split: split_fingerprint(tokens, sums.get(split, {}).get("sha256"))
          for split, tokens in (("train", train_tokens), ("validation", validation_tokens))}


SAMPLES, SAMPLE_TOKENS = 64, 4096  # Sampled checksum: 64 evenly spaced runs of 4096 tokens.


def split_fingerprint(tokens: np.ndarray, sha256: str | None = None) -> dict:
  """The size and a sampled sha256 of one split's tokens, cheap at any size (a full checksum
  of a 100 GB corpus would take minutes at every start), plus the full-file `sha256` that
  preparation recorded, where there is one (a Megatron pair has none)."""
  starts = np.linspace(0, max(len(tokens) - SAMPLE_TOKENS, 0), SAMPLES).astype(np.int64)
  digest = hashlib.sha256()
  for start in np.unique(starts):
    digest.update(np.asarray(tokens[start:start + SAMPLE_TOKENS]).tobytes())
  fingerprint = {"tokens": int(len(tokens)), "dtype": str(tokens.dtype),
                 "sample_sha256": digest.hexdigest()}
  return {**fingerprint, "sha256": sha256} if sha256 else fingerprint


def check_data(saved: dict | None, current: dict, where: str, data_dir: str):
  """Raises ResumeError when the token files differ from those the checkpoint trained on
  (`saved`: {split: split_fingerprint}; None for checkpoints of older releases: unchecked)."""
  for split, then in (saved or {}).items():
    now = current.get(split)
    if now != then:
      what = ("its tokens differ (sha256)" if now and now["tokens"] == then["tokens"]
              else f"{then['tokens']:,} tokens there, {now['tokens'] if now else 0:,} here")
      raise ResumeError(
          f"the {split!r} token files of data.dir={data_dir!r} changed since {where} was "
          f"saved ({what}): resume with the data it trained on, or start a new --workdir")


JOURNAL = "rollback.json"


def write_journal(workdir: str, target: int, loader: dict, monitor: dict, events: list[dict],
                  pacing: dict | None = None):
  """Records a rollback before any checkpoint is deleted: resume from `target` with this
  loader position (past the bad batch), monitor state and adaptive pacing state (that of the
  target: None for a fixed schedule), whatever the newest checkpoint, and log its `events`
  (if the crash came before they were)."""
  journal = {"target": target, "loader": loader, "monitor": monitor, "events": events}
  if pacing is not None:
    journal["pacing"] = pacing
  reporting.write_json(os.path.join(workdir, JOURNAL), journal)


def read_journal(workdir: str) -> dict | None:
  """The unfinished rollback's record, or None. A journal cut short (a kill while writing is
  impossible: it is renamed into place) or unreadable is an error, not silence."""
  path = os.path.join(workdir, JOURNAL)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ResumeError(f"{path} is unreadable ({error}): delete it to resume from the newest "
                      "checkpoint (the rollback it recorded will then be redone)") from None


def clear_journal(workdir: str):
  """Called once a checkpoint after the rollback's target is on disk."""
  path = os.path.join(workdir, JOURNAL)
  if os.path.exists(path):
    os.remove(path)
