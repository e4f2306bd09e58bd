"""Run outputs: metrics.jsonl, eval rows, events.jsonl, TensorBoard, progress bar or log lines
(and Weights & Biases when `log.wandb_project` is set: slw_jax.wandb_log).

Every file is appended line by line and flushed, so a killed run keeps everything it logged.
Only the primary process (process 0) writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable

STEP_KEYS = ("step", "tokens", "seqlen", "batch_size", "lr", "loss", "loss_ratio", "grad_norm",
             "adam_nu_l1", "adam_nu_max", "step_time_s", "tokens_per_s", "mfu")
DEVICE_KEYS = ("loss", "loss_ratio", "grad_norm", "adam_nu_l1", "adam_nu_max")  # From the step.


def _json_value(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf: "nan", "inf".
  return value


def _write_jsonl(f, row: dict):
  f.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
  f.flush()


def truncate_jsonl(path: str, before_step: int) -> list[dict]:
  """Drops what a run resumed at `before_step` will write again: step rows and events from
  that step on, evaluations after it (the evaluation at the resume step itself is not redone).
  Rollback events are kept: they record a trajectory the resumed run will not repeat.
  Returns the rows kept."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # A line cut off by a kill.
    step = row.get("step", -1)
    if (step < before_step or ("val_loss" in row and step == before_step) or
        row.get("event") == "rollback"):
      kept.append(line)
  replace_durably(path, lambda f: f.writelines(kept))
  return [json.loads(line) for line in kept]


def summary(*, completed: bool, stopped_by, steps: int, schedule, wall_time_s: float,
            last_eval: dict, executables, stall_before_loop, stability: dict,
            save_abandoned: bool, pacing: dict, left_running: list) -> dict:
  """The run's summary.json: where it ended and why, its last evaluation, what compiling cost
  (`executables`: compiled_steps.BucketedStep), its stability counters and its pacing;
  `left_running`: the threads a stop's deadline left running (a compile, an abandoned save)."""
  stall = executables.stall_s
  return {
      "completed": completed, "stopped_by": stopped_by, "steps": steps,
      "total_steps": schedule.num_steps, "tokens": int(schedule.tokens_before[steps]),
      "wall_time_s": wall_time_s, "final_val_loss": last_eval.get("val_loss"),
      "final_val_ppl": last_eval.get("val_ppl"), "compile_stall_s": stall,
      "compile_stall_after_step0_s": stall - (stall_before_loop or 0.0),
      "buckets": [vars(s) for s in executables.stats.values()],
      "other_compile_s": dict(executables.other_compile_s),
      "executables_released": executables.released,
      "stability": stability, "save_abandoned": save_abandoned, "pacing": pacing,
      "left_running": left_running,
  }


def step_row(step: int, tokens_before: int, shape: tuple[int, int], lr: float, values: dict,
             step_time: float, peak_seconds: float) -> dict:
  """The metrics row of one step (STEP_KEYS, plus z_loss and skipped when present) from the
  step's device `values`. `peak_seconds`: the step's FLOPs over the devices' peak FLOP/s (so
  MFU = peak_seconds / step_time). Tokens are real ones: a padded bucket's padding is not
  counted."""
  batch_size, seqlen = shape
  row = {"step": step, "tokens": tokens_before, "seqlen": seqlen, "batch_size": batch_size,
         "lr": lr, **{k: float(values[k]) for k in DEVICE_KEYS},
         "step_time_s": step_time, "tokens_per_s": batch_size * seqlen / step_time,
         "mfu": peak_seconds / step_time}
  if "z_loss" in values:  # optim.z_loss > 0 only: rows without it had no z-loss.
    row["z_loss"] = float(values["z_loss"])
  if bool(values["skipped"]):
    row["skipped"] = True
  return row


class RunLog:
  """Writes a run's metrics, evaluations and events; shows progress."""

  def __init__(self, workdir: str, total_steps: Callable[[], int], total_tokens: int,
               start_step: int, start_tokens: int, print_every: int, primary: bool = True,
               mirror=None):
    """`total_steps()`: the run's step count now (adaptive pacing redraws the schedule);
    `mirror`: a wandb_log.WandbLog that gets every row, event and the summary too, or None."""
    self.primary, self.print_every, self.workdir = primary, print_every, workdir
    self.mirror = mirror
    if mirror is not None:
      mirror.begin()
    self.total_steps, self.total_tokens = total_steps, total_tokens
    self.started = time.time()
    self.start_tokens = start_tokens
    if not primary:
      return
    os.makedirs(workdir, exist_ok=True)
    paths = {name: os.path.join(workdir, f"{name}.jsonl") for name in ("metrics", "events")}
    truncate_jsonl(paths["metrics"], start_step)
    # A rollback's events are logged again by a resume that completes it (its journal): once.
    self._rollbacks_logged = {json.dumps(e, sort_keys=True) for e in
                              truncate_jsonl(paths["events"], start_step)
                              if e.get("event") == "rollback"}
    self.metrics = open(paths["metrics"], "a")
    self.events_file = open(paths["events"], "a")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
    self.bar = None
    if sys.stderr.isatty():
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=total_tokens, initial=start_tokens, unit="tok", unit_scale=True,
                      dynamic_ncols=True)

  def info(self, message: str):
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.write(message)
    else:
      print(message, flush=True)

  def step(self, row: dict, tokens_done: int):
    if not self.primary:
      return
    _write_jsonl(self.metrics, row)
    if self.mirror is not None:
      self.mirror.step(row)
    for key in STEP_KEYS[2:]:
      if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
        self.tb.add_scalar(f"train/{key}", row[key], row["step"])
    if self.bar is not None:
      self.bar.update(tokens_done - self.bar.n)
      self.bar.set_postfix(seqlen=row["seqlen"], loss=f"{row['loss']:.4f}", refresh=False)
    elif row["step"] % self.print_every == 0 or row["step"] == self.total_steps() - 1:
      self.info(self._line(row, tokens_done))

  def _line(self, row: dict, tokens_done: int) -> str:
    elapsed = time.time() - self.started
    rate = (tokens_done - self.start_tokens) / elapsed if elapsed > 0 else 0.0
    eta = (self.total_tokens - tokens_done) / rate if rate > 0 else float("inf")
    return (f"step {row['step']}/{self.total_steps()} tokens {tokens_done:,}/{self.total_tokens:,} "
            f"({tokens_done / self.total_tokens:.0%}) seqlen {row['seqlen']} "
            f"loss {row['loss']:.4f} ratio {row['loss_ratio']:.3f} lr {row['lr']:.3g} "
            f"{row['tokens_per_s']:,.0f} tok/s eta {_duration(eta)}")

  def eval(self, row: dict):
    if not self.primary:
      return
    _write_jsonl(self.metrics, row)
    if self.mirror is not None:
      self.mirror.eval(row)
    self.tb.add_scalar("eval/val_loss", row["val_loss"], row["step"])
    self.tb.add_scalar("eval/val_ppl", row["val_ppl"], row["step"])
    self.info(f"eval step {row['step']} tokens {row['tokens']:,}: val_loss {row['val_loss']:.4f} "
              f"val_ppl {row['val_ppl']:.2f}")

  def events(self, events: list[dict]):
    if not self.primary:
      return
    for event in events:
      if event.get("event") == "rollback":
        key = json.dumps(event, sort_keys=True)
        if key in self._rollbacks_logged:
          continue
        self._rollbacks_logged.add(key)
      _write_jsonl(self.events_file, event)
      if self.mirror is not None:
        self.mirror.event(event)
      details = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in event.items() if k not in ("step", "event"))
      self.info(f"event {event['event']} at step {event['step']}: {details}")

  def finish(self, summary: dict, compile_wait_s: float):
    """Writes summary.json and stability.json, says where everything is, and closes."""
    if self.primary:
      write_json(os.path.join(self.workdir, "summary.json"), summary)
      write_json(os.path.join(self.workdir, "stability.json"), summary["stability"])
      if self.mirror is not None:
        self.mirror.finish(summary)
    w = self.workdir
    self.info(f"{'finished' if summary['completed'] else 'stopped'} at step {summary['steps']}; "
              f"waited {compile_wait_s:.1f} s on compilation; metrics {w}/metrics.jsonl, "
              f"TensorBoard {w}/tb, checkpoints {w}/checkpoints, summary {w}/summary.json")
    self.close()

  def close(self):
    if not self.primary:
      return
    if self.bar is not None:
      self.bar.close()
    self.tb.close()
    self.metrics.close()
    self.events_file.close()
    if self.mirror is not None:  # After an error (finish() closed it already otherwise).
      self.mirror.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def perplexity(loss: float) -> float:
  """exp(loss), capped where float64 would overflow (a diverged run still logs a number)."""
  return math.exp(min(loss, 700.0))


def replace_durably(path: str, write):
  """Replaces `path` with what `write(file)` writes, atomically and durably: a temp file,
  flushed to disk, renamed over it. A crash at any moment leaves the old or the new file whole,
  never half of one (a history of metrics rewritten in place could be lost)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    os.fsync(directory)  # The rename itself survives a power loss.
  finally:
    os.close(directory)


def write_json(path: str, data: dict):
  """Writes atomically and durably (`replace_durably`): a reader never sees half a file."""
  replace_durably(path, lambda f: json.dump(data, f, indent=1, default=_json_value))
