"""Per-run records: what the analysis reads, small enough to commit.

One gzip'd JSON file per run (`records/<run>.json.gz`): the run's identity (arm, learning rate,
seed, kind), its flattened config, how it ended, and its metrics rows as columns (training rows:
the fields the tables use, plus cumulative FLOPs; validation rows). Every table and plot of
RESULTS.md is recomputed from these files alone (`run.py --analyse`), so a reader can check
every figure without training.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os

from slw_jax import config_diff, config_lib, report

STEP_FIELDS = ("step", "tokens", "seqlen", "batch_size", "lr", "loss", "loss_ratio", "grad_norm",
               "adam_nu_l1", "adam_nu_max", "step_time_s")
EVAL_FIELDS = ("step", "tokens", "val_loss")
# Config fields that do not change what a run computes (paths, logging, compile mechanics):
# a record made elsewhere, or with another cache directory, is still the same run.
NOT_THE_REGIME = ("compile.", "log.", "checkpoint.", "data.dir", "data.prefetch", "hardware.",
                  "distributed.")


def flat_config(c) -> dict:
  return config_diff.flatten(json.loads(json.dumps(c.to_dict())))


def with_new_keys(flat: dict) -> dict:
  """A flattened config recorded by an earlier release, with the keys added since (e.g.
  pacing.adaptive.*) at their defaults: the same run as before, not another regime."""
  defaults = config_diff.flatten(json.loads(json.dumps(config_lib.base_config().to_dict())))
  return {**{k: v for k, v in defaults.items() if k not in flat}, **flat}


def fingerprint(flat: dict, tuner: bool = False) -> dict:
  """The fields of a flattened config that decide what a run computes (the tuner's settings,
  `tune.*`, only with `tuner`: they decide the tuner's choice, not a run's steps)."""
  flat = with_new_keys(flat)
  ignored = NOT_THE_REGIME + (() if tuner else ("tune.",))
  if flat.get("pacing.kind") != "adaptive":  # Its settings do nothing then.
    ignored += ("pacing.adaptive.",)
  return {k: v for k, v in flat.items() if not k.startswith(ignored)}


@dataclasses.dataclass
class Record:
  name: str  # e.g. "slw_lr0.01_seed0".
  kind: str  # "sweep" (an arm), "mechanism" (a fixed-length probe) or "tune" (tuner cost).
  arm: str
  lr: float
  seed: int
  config: dict  # Flattened config.
  outcome: dict  # completed, diverged (message or None), final_val_loss, seconds.
  steps: dict  # Column name -> list; "flops" is cumulative training FLOPs after each step.
  evals: dict

  def run(self) -> report.Run:
    """The record as a report.Run (rows with train_time_s), for report's statistics."""
    steps, evals, wall = [], [], 0.0
    step_rows = [dict(zip(self.steps, values)) for values in zip(*self.steps.values())]
    for row in step_rows:
      wall += row["step_time_s"]
      steps.append({**row, "train_time_s": wall})
    eval_rows = [dict(zip(self.evals, values)) for values in zip(*self.evals.values())]
    for row in eval_rows:  # Evaluations come after the step that reached their token count.
      done = [s for s in steps if s["tokens"] + s["seqlen"] * s["batch_size"] <= row["tokens"]]
      evals.append({**row, "val_ppl": math.exp(min(row["val_loss"], 50.0)),
                    "train_time_s": done[-1]["train_time_s"] if done else 0.0,
                    "flops": done[-1]["flops"] if done else 0.0})
    return report.Run(self.name, "", steps, evals, {})


def from_workdir(name: str, kind: str, arm: str, lr: float, seed: int, c, outcome: dict,
                 workdir: str) -> Record:
  """The record of a finished run in `workdir` (needs JAX for the parameter count)."""
  from slw_jax import models  # pylint: disable=g-import-not-at-top  (JAX only when recording)
  run = report.read_run(workdir)
  cfg = models.GPTConfig.from_config(c.model)
  n_params = models.num_params(cfg)
  steps = {field: [row.get(field) for row in run.steps] for field in STEP_FIELDS}
  flops, total = [], 0.0
  for row in run.steps:
    per_token = models.train_flops_per_token(cfg, int(row["seqlen"]), n_params)
    total += per_token * row["seqlen"] * row["batch_size"]
    flops.append(total)
  steps["flops"] = flops
  evals = {field: [row[field] for row in run.evals] for field in EVAL_FIELDS}
  return Record(name, kind, arm, lr, seed, flat_config(c), outcome, steps, evals)


def path(records_dir: str, name: str) -> str:
  return os.path.join(records_dir, f"{name}.json.gz")


def write(records_dir: str, record: Record):
  os.makedirs(records_dir, exist_ok=True)
  target = path(records_dir, record.name)
  data = json.dumps(dataclasses.asdict(record), separators=(",", ":")).encode()
  with open(target + ".tmp", "wb") as raw:  # mtime 0, no name: the same run, the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
      f.write(data)
  os.replace(target + ".tmp", target)


def read(records_dir: str, name: str) -> Record | None:
  target = path(records_dir, name)
  if not os.path.exists(target):
    return None
  with gzip.open(target, "rt") as f:
    return Record(**json.load(f))


def read_all(records_dir: str) -> dict[str, Record]:
  if not os.path.isdir(records_dir):
    return {}
  names = sorted(f[:-len(".json.gz")] for f in os.listdir(records_dir) if f.endswith(".json.gz"))
  return {name: read(records_dir, name) for name in names}
