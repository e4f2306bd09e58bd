"""Weights & Biases logging (`log.wandb_project`; off when empty). Only process 0 logs.

The run's id is kept in `WORKDIR/wandb_run.json`, so a resumed run continues the same W&B run
(`resume="allow"`). Offline runs, and W&B's own files, go under `WORKDIR/wandb/` (upload an
offline one later with `wandb sync WORKDIR/wandb/offline-run-*`).

What is logged: the config (once), every metrics row as `train/<key>` and every evaluation as
`eval/<key>`, each event (rollbacks, skips, schedule changes, pacing decisions) as
`events/<kind>/<field>`, all against the step metric `step`; the summary at the end; and
`report --wandb` adds the report's plots. The local files stay the record: a resume logs the
steps between its checkpoint and the stop once more (W&B's history is append-only), while
metrics.jsonl is rewritten to hold each step once.

`wandb` is optional: a config that names a project without it installed is a config error
(config_lib), before anything starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets

from slw_jax import errors

RUN_FILE = "wandb_run.json"
SUMMARY_KEYS = ("completed", "stopped_by", "steps", "total_steps", "tokens", "wall_time_s",
                "final_val_loss", "final_val_ppl", "compile_stall_s", "save_abandoned")


class WandbError(errors.InputError):
  """W&B could not start the run (no API key, endpoint unreachable, no such entity)."""


def _stored(workdir: str) -> dict | None:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
    if not isinstance(stored.get("id"), str) or not stored["id"]:
      raise ValueError("no run id")
    return stored
  except (OSError, ValueError, AttributeError) as error:
    raise WandbError(f"{path} is unreadable ({errors.one_line(error, 100)}): it names the W&B "
                     "run a resume continues; restore it, or delete it to start a new "
                     "run") from None


PACKAGE = "wandb==0.31.0"  # The optional package, as requirements-test.txt pins it.


def installed() -> bool:
  """Whether the optional wandb package can be imported (checked without importing it)."""
  return importlib.util.find_spec("wandb") is not None


def _import_wandb():
  import wandb  # pylint: disable=g-import-not-at-top
  return wandb


def start_run(workdir: str, project: str, entity: str = "", name: str = "",
              mode: str = "online", config: dict | None = None, job_type: str = "train"):
  """The W&B run of `workdir`: the one its wandb_run.json names (resumed), else a new one
  (its id is stored there). `config`: logged with the run. A WandbError when W&B refuses."""
  wandb = _import_wandb()
  from slw_jax import run_log  # pylint: disable=g-import-not-at-top  (run_log imports this)
  stored = _stored(workdir)
  run_id = stored["id"] if stored else secrets.token_hex(4)  # W&B ids: [a-z0-9].
  os.makedirs(workdir, exist_ok=True)
  try:
    # create_new: a run an earlier error left open in this process is never handed back.
    run = wandb.init(project=project, entity=entity or None, id=run_id, resume="allow",
                     name=name or os.path.basename(os.path.abspath(workdir)), mode=mode,
                     dir=workdir, config=config, job_type=job_type, reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True))
  except wandb.errors.Error as error:
    hint = " (or log.wandb_mode=offline)" if mode == "online" else ""
    raise WandbError(f"log.wandb_project={project!r} (log.wandb_mode={mode}): W&B could not "
                     f"start the run: {errors.one_line(error, 200)}{hint}") from None
  record = {"id": run_id, "project": project, "entity": entity, "mode": mode, "name": run.name}
  if stored != record:  # New, or a resume under other log.wandb_* settings.
    run_log.write_json(os.path.join(workdir, RUN_FILE), record)
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


def _loggable(value):
  if isinstance(value, bool) or value is None:
    return value
  if isinstance(value, (int, float, str)):
    return value
  return str(value)


class WandbLog:
  """Mirrors a RunLog's rows, evaluations, events and summary into one W&B run."""

  def __init__(self, log_cfg, workdir: str, config: dict):
    self.run = start_run(workdir, log_cfg.wandb_project, log_cfg.wandb_entity,
                         log_cfg.wandb_name, log_cfg.wandb_mode)
    self.config = config

  def begin(self):
    """Logs the config when the loop starts: a resume refused in setup (another model, say)
    never rewrites the config of the run it would have continued."""
    self.run.config.update(self.config, allow_val_change=True)

  def step(self, row: dict):
    self.run.log({"step": row["step"], **{f"train/{k}": _loggable(v) for k, v in row.items()
                                          if k != "step"}})

  def eval(self, row: dict):
    self.run.log({"step": row["step"], **{f"eval/{k}": _loggable(v) for k, v in row.items()
                                          if k != "step"}})

  def event(self, event: dict):
    kind = event["event"]
    fields = {f"events/{kind}/{k}": _loggable(v) for k, v in event.items()
              if k not in ("step", "event")}
    self.run.log({"step": event["step"], f"events/{kind}": 1, **fields})

  def finish(self, summary: dict):
    values = {k: summary.get(k) for k in SUMMARY_KEYS}
    self.run.summary.update({k: v for k, v in values.items()
                             if not (isinstance(v, float) and not math.isfinite(v))})
    self.close(exit_code=0)

  def close(self, exit_code: int = 1):
    """Finishes the run (exit code 1 unless `finish` ended it); a second call does nothing."""
    if self.run is not None:
      self.run.finish(exit_code=exit_code)
      self.run = None


def open_for(c, workdir: str, primary: bool) -> WandbLog | None:
  """The run's W&B mirror on process 0 when `log.wandb_project` is set; else None."""
  if not primary or not c.log.wandb_project:
    return None
  return WandbLog(c.log, workdir, c.to_dict())


def log_plots(workdir: str, out: str, plots: list[str]) -> bool:
  """`report --wandb`: adds the report's PNGs to the W&B run `workdir` logged to (by its
  wandb_run.json). False when the run did not log to W&B."""
  stored = _stored(workdir)
  if stored is None:
    return False
  wandb = _import_wandb()
  run = start_run(workdir, stored["project"], stored.get("entity", ""), stored.get("name", ""),
                  stored.get("mode", "online"), job_type="report")
  try:
    run.log({f"report/{os.path.splitext(name)[0]}": wandb.Image(os.path.join(out, name))
             for name in plots})
  finally:
    run.finish()
  return True
