"""End-to-end runs of the trainer on a tiny model: outputs, resume, signals, monitor actions."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TEST_RUN, metric_rows as _rows, poison_position
from stops import StopAt
from slw_jax import errors, hardware, input_pipeline, run_log, train_step, trainer


@pytest.mark.slow
def test_full_run_outputs_and_one_compile_per_bucket(make_config, tmp_path, cache_dir):
  c = make_config()
  run = trainer.Trainer(c, str(tmp_path))
  summary = run.run()
  assert summary["completed"] and summary["steps"] == 12
  buckets = run.schedule.buckets()
  assert [b.seqlen for b in buckets] == [8, 16, 24, 32]
  assert run.executables.num_compiled == len(buckets) == len(summary["buckets"])
  assert run.num_params == 22_240  # The 259-token vocabulary padded to 264 rows (TEST_RUN).
  assert os.listdir(cache_dir)  # The persistent compilation cache received executables.
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == list(range(12))
  for row in rows:
    assert set(run_log.STEP_KEYS) <= set(row)
    assert row["tokens"] == run.schedule.tokens_before[row["step"]]
    assert row["lr"] == pytest.approx(run.lrs[row["step"]])
  evals = _rows(tmp_path, "val_loss")
  assert [e["step"] for e in evals] == [6, 12]
  assert evals[-1]["val_ppl"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
  assert summary["final_val_loss"] == evals[-1]["val_loss"]
  stability = json.load(open(tmp_path / "stability.json"))
  assert {"unstable_steps", "max_loss_ratio", "pearson_loss_ratio_vs_adam_nu_max"} <= set(stability)
  written = json.load(open(tmp_path / "summary.json"))
  assert written["compile_stall_s"] >= written["compile_stall_after_step0_s"] >= 0
  assert max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == 12
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
  assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.slow
def test_a_second_run_takes_every_bucket_from_the_persistent_cache(make_config, tmp_path,
                                                                    monkeypatch):
  """The persistent compilation cache works across runs: a rerun of the same config compiles
  none of its buckets again. JAX's compiler log names the module of every cache hit and miss:
  each of the 4 buckets' train steps is a hit (4 distinct cache keys), and nothing misses (a
  count of hits alone would pass with a bucket recompiled, the eval and init hits making up
  for it). Every executable is cached here, however fast it compiled (the trainer's threshold
  is 0.5 s)."""
  import logging  # pylint: disable=g-import-not-at-top
  enable = hardware.enable_compilation_cache

  def enable_for_every_compile(cache_dir):
    enable(cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  monkeypatch.setattr(hardware, "enable_compilation_cache", enable_for_every_compile)
  c = make_config()
  lookups = {"hit": [], "miss": []}  # (module name, cache key) of each persistent-cache lookup.

  def record_lookup(record):
    if record.msg.startswith("Persistent compilation cache hit"):
      lookups["hit"].append(record.args)
    elif record.msg.startswith("PERSISTENT COMPILATION CACHE MISS"):
      lookups["miss"].append(record.args)
  handler = logging.Handler()
  handler.emit = record_lookup
  compiler_log = logging.getLogger("jax._src.compiler")  # Hits and misses are logged at DEBUG.
  level = compiler_log.level
  try:
    trainer.Trainer(c, str(tmp_path / "first")).run()
    compiler_log.addHandler(handler)
    compiler_log.setLevel(logging.DEBUG)
    rerun = trainer.Trainer(c, str(tmp_path / "second"))
    summary = rerun.run()
  finally:
    compiler_log.removeHandler(handler)
    compiler_log.setLevel(level)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  assert summary["completed"]
  assert rerun.executables.num_compiled == len(rerun.schedule.buckets()) == 4
  assert lookups["miss"] == []
  step_keys = {key for module, key in lookups["hit"] if module == "jit_step_fn"}
  assert len(step_keys) == 4, lookups["hit"]


@pytest.mark.slow
def test_resumed_run_is_bitwise_identical(make_config, tmp_path):
  c = make_config()
  reference = trainer.Trainer(c, str(tmp_path / "a"))
  reference.run()
  stopped = StopAt(c, str(tmp_path / "b")).run()
  assert not stopped["completed"] and stopped["stopped_by"] == "SIGTERM"
  assert stopped["steps"] in (6, 7)  # Step 5, plus step 6 if it was already in flight.
  resumed = trainer.Trainer(c, str(tmp_path / "b"))
  assert resumed.run()["completed"]
  a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(12))
  assert [r["loss"] for r in a] == [r["loss"] for r in b]  # Bitwise equal floats.
  assert [r["adam_nu_max"] for r in a] == [r["adam_nu_max"] for r in b]
  assert [e["step"] for e in _rows(tmp_path / "b", "val_loss")] == [6, 12]  # None lost.
  other_model = trainer.Trainer(make_config(model__n_layer=2), str(tmp_path / "b"))
  with pytest.raises(errors.StopTraining, match=r"another model \(model.n_layer=1 there, 2 here"):
    other_model.setup()


@pytest.mark.slow
def test_resume_restacks_a_checkpoint_of_the_other_scan_layers_setting(make_config, tmp_path):
  """Saved unrolled, resumed scanned (and back): the run goes on as if never switched."""
  unrolled = make_config(model__n_layer=2, model__scan_layers=False)
  scanned = make_config(model__n_layer=2, model__scan_layers=True)
  trainer.Trainer(unrolled, str(tmp_path / "a")).run()
  assert not StopAt(unrolled, str(tmp_path / "b")).run()["completed"]
  switched = trainer.Trainer(scanned, str(tmp_path / "b"))
  switched.setup()
  assert switched.state["params"]["blocks"]["attn"]["qkv_weight_dchk"].shape[0] == 2
  assert switched.run()["completed"]
  a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
  assert [r["step"] for r in b] == list(range(12))
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
  longer = make_config(model__n_layer=2, model__scan_layers=False, train_steps=13)
  with pytest.raises(errors.StopTraining, match=r"another recipe.*--allow_schedule_change.*"
                     r"train_steps=12 there, 13 here"):
    trainer.Trainer(longer, str(tmp_path / "b")).setup()
  back = trainer.Trainer(longer, str(tmp_path / "b"), allow_schedule_change=True)
  assert back.run()["completed"]  # The scanned checkpoint of step 12 restacked the other way.


@pytest.mark.slow
def test_sigterm_saves_and_resumes(make_config, tmp_path, corpus_dir):
  # Both budgets given: the command line cannot unset tiny.py's train_tokens, and a resume
  # must see the recipe it was started with.
  c = make_config(train_steps=400, train_tokens=10**9, checkpoint__every_steps=1000,
                  eval__every_steps=1000)
  workdir = tmp_path / "run"
  overrides = [f"--config.{k}={v}" for k, v in {
      **TEST_RUN, "train_steps": 400, "train_tokens": 10**9, "eval.every_steps": 1000,
      "checkpoint.every_steps": 1000,
      "data.source": c.data.source, "data.dir": c.data.dir,
      "compile.cache_dir": c.compile.cache_dir}.items() if v is not None]
  # main, with an atexit handler that only a normal exit runs (os._exit skips it).
  main = ("import atexit, sys; atexit.register(print, 'exited normally', flush=True); "
          "from slw_jax import main; main.main(sys.argv)")
  process = subprocess.Popen(
      [sys.executable, "-c", main, "--config=configs/tiny.py", f"--workdir={workdir}",
       *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if (workdir / "metrics.jsonl").exists() and len(_rows(workdir)) >= 20:
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output
  assert time.monotonic() - signalled < 30, output  # checkpoint.preemption_timeout_s
  assert "SIGTERM: finishing the current step and saving" in output
  assert output.rstrip().endswith("exited normally"), output  # Threads joined: no os._exit.
  summary = json.load(open(workdir / "summary.json"))
  assert not summary["completed"] and 20 <= summary["steps"] < 400
  assert str(summary["steps"]) in os.listdir(workdir / "checkpoints")
  resumed = trainer.Trainer(c, str(workdir))
  assert resumed.step == 0 and resumed.run()["completed"]
  assert [r["step"] for r in _rows(workdir)] == list(range(400))


class _SlowCompile:
  """A jitted function whose compile outlasts any preemption deadline (until `release`)."""

  def __init__(self):
    self.started, self.release = threading.Event(), threading.Event()

  def lower(self, *specs):
    del specs
    return self

  def compile(self):
    self.started.set()
    self.release.wait(120)


class _StopWhileCompiling(trainer.Trainer):
  """A SIGTERM after step 3 while a compile that outlasts the deadline runs."""

  slow = None

  def _finish_step(self, t, metrics):
    if t == 3:
      self.executables.compile_other("slow", self.slow, priority=-1)
      assert self.slow.started.wait(60)
      self.stop.on_signal("SIGTERM")
      self.signalled = time.monotonic()
    return super()._finish_step(t, metrics)


@pytest.mark.slow
def test_a_stop_waits_for_a_compile_in_flight_only_until_the_deadline(make_config, tmp_path):
  run = _StopWhileCompiling(make_config(checkpoint__preemption_timeout_s=3.0), str(tmp_path))
  run.slow = _SlowCompile()
  try:
    summary = run.run()
    returned = time.monotonic()
  finally:
    run.slow.release.set()
  assert summary["stopped_by"] == "SIGTERM" and not summary["completed"]
  assert returned - run.signalled < 3.0 + 5  # The deadline, and the summary's writing.
  compiling = [name for name in summary["left_running"] if not name.startswith("the save")]
  assert len(compiling) == 1, summary["left_running"]  # main exits without waiting for it.
  assert json.load(open(tmp_path / "summary.json"))["left_running"] == summary["left_running"]


def _events(workdir):
  with open(os.path.join(workdir, "events.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_skip_action_drops_the_nan_update(make_config, tmp_path, monkeypatch):
  poison_position(monkeypatch, 3 * 4)  # Step 3 (4 windows per step in truncate mode).
  summary = trainer.Trainer(make_config(monitor__action="skip"), str(tmp_path)).run()
  assert summary["completed"] and summary["stability"]["skipped_steps"] == 1
  assert [e["event"] for e in _events(tmp_path)] == ["skip"] and _events(tmp_path)[0]["step"] == 3
  losses = [r["loss"] for r in _rows(tmp_path)]
  assert losses[3] == "nan" and all(np.isfinite(l) for i, l in enumerate(losses) if i != 3)


@pytest.mark.slow
def test_repeated_rollbacks_never_replay_skipped_data(make_config, tmp_path, monkeypatch):
  poison_position(monkeypatch, 5 * 4, 6 * 4)  # The batches of steps 5 and 6.
  c = make_config(monitor__action="rollback", checkpoint__every_steps=4)
  summary = trainer.Trainer(c, str(tmp_path)).run()
  assert summary["completed"] and summary["stability"]["rollbacks"] == 2
  rollbacks = [e for e in _events(tmp_path) if e["event"] == "rollback"]
  assert [(e["step"], e["to_step"]) for e in rollbacks] == [(5, 4), (4, 4)]
  assert sum(r["loss"] == "nan" for r in _rows(tmp_path)) == 2  # Each bad batch seen once.
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved[-1] == 12 and all(k % 4 == 0 for k in saved)


def _nan_gradients_at(monkeypatch, hit):
  """Steps where `hit(step)` (traced) get a finite loss but NaN gradients, inside the step."""
  original = train_step.make_loss_and_grads

  def poisoned_factory(*args):
    loss_and_grads = original(*args)

    def poisoned(params, batch, step):
      loss, grads = loss_and_grads(params, batch, step)
      return loss, jax.tree.map(lambda g: jnp.where(hit(step), jnp.nan, g), grads)
    return poisoned
  monkeypatch.setattr(train_step, "make_loss_and_grads", poisoned_factory)


@pytest.mark.slow
def test_bad_gradients_are_skipped_then_too_many_in_a_row_stop_the_run(make_config, tmp_path,
                                                                       monkeypatch):
  """Skip drops one finite-loss NaN-gradient update (step 3); from step 6 every update is bad,
  and after monitor.max_bad_in_a_row of them the run stops with one line, checkpoints kept."""
  _nan_gradients_at(monkeypatch, lambda step: (step == 3) | (step >= 6))
  c = make_config(monitor__action="skip", monitor__max_bad_in_a_row=3, checkpoint__every_steps=4)
  with pytest.raises(trainer.BadStepsStop, match=r"^the last 3 steps \(up to step 8\) were all "
                     r"bad \(monitor.max_bad_in_a_row=3: non-finite loss or gradient norm.*"
                     r"checkpoints kept in .*\(the newest before them: step 8\)"):
    trainer.Trainer(c, str(tmp_path)).run()
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows if r.get("skipped")] == [3, 6, 7, 8]
  assert all(np.isfinite(r["loss"]) for r in rows)  # The skipped updates never reached params.
  assert [e["event"] for e in _events(tmp_path)] == ["skip", "skip", "skip", "skip", "stop"]
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [0, 4, 8]  # Skipped updates leave nothing bad to save.


@pytest.mark.slow
def test_applied_bad_updates_are_never_checkpointed(make_config, tmp_path, monkeypatch):
  """Under monitor.action=log NaN gradients reach the parameters: no checkpoint is saved during
  the streak, and the stop names the newest checkpoint from before it."""
  _nan_gradients_at(monkeypatch, lambda step: step >= 5)
  c = make_config(monitor__max_bad_in_a_row=4, checkpoint__every_steps=2)
  with pytest.raises(trainer.BadStepsStop, match=r"the last 4 steps \(up to step 8\).*"
                     r"\(the newest before them: step 4\)"):
    trainer.Trainer(c, str(tmp_path)).run()
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [0, 2, 4]  # Steps 6 and 8 came after bad updates: not saved.


@pytest.mark.slow
def test_memory_check_stops_before_step_0(make_config, tmp_path, monkeypatch):
  monkeypatch.setattr(hardware, "device_memory_limit", lambda: 1000)
  with pytest.raises(errors.StopTraining, match=r"largest bucket \(batch 4 x seqlen 32\) needs"):
    trainer.Trainer(make_config(), str(tmp_path)).run()
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_first_bucket_compiles_in_the_background_beside_the_memory_check(make_config, tmp_path,
                                                                         monkeypatch):
  """Where the device reports its memory, the largest bucket compiles in the loop's thread for
  the check while the first bucket compiles in the pool; both before step 0."""
  monkeypatch.setattr(hardware, "device_memory_limit", lambda: 2**34)
  run = trainer.Trainer(make_config(), str(tmp_path))
  run.setup()
  run.executables.get((4, 8))  # Waits for the pool's compile, if it is still running.
  stats = run.executables.stats
  assert not stats[(4, 32)].background and stats[(4, 8)].background
  assert run.executables.stall_s < stats[(4, 32)].compile_s + stats[(4, 8)].compile_s
  run.executables.close()
  run.checkpoints.close()


def test_main_requires_a_workdir():
  result = subprocess.run([sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and "error: --workdir is required" in result.stderr


@pytest.mark.slow
def test_run_with_microbatches_and_remat_logs_its_choices(make_config, tmp_path, capsys):
  """A whole run with the paper configs' memory settings: microbatches chosen per bucket (the
  largest bucket's count, fewer for short ones), remat on, every step finite."""
  c = make_config(**{"optim.microbatches": 2, "model.remat": "block", "mesh.data": 2,
                     "mesh.fsdp": 2, "mesh.tensor": 2, "batch_size": 8,
                     "model.scan_layers": True, "model.n_layer": 2})
  run = trainer.Trainer(c, str(tmp_path))
  summary = run.run()
  assert summary["completed"]
  out = capsys.readouterr().out
  assert "attention: blockwise (auto: CPU" in out
  assert "microbatches: 2 for the largest bucket 8x32 (optim.microbatches)" in out
  counts = {(b["batch_size"], b["seqlen"]): b["microbatches"] for b in summary["buckets"]}
  assert counts == {(8, 8): 1, (8, 16): 1, (8, 24): 2, (8, 32): 2}
  assert all(np.isfinite(r["loss"]) for r in _rows(tmp_path))


def test_bad_microbatches_stop_before_any_compile(make_config, tmp_path):
  c = make_config(**{"optim.microbatches": 2})  # batch 4 over data=4: one row per shard.
  with pytest.raises(errors.ConfigError, match=r"config.optim.microbatches=2 is invalid: "
                     r"the largest bucket's batch of 4 rows over 4 data-parallel shard\(s\) "
                     r"splits into 1 microbatches"):
    trainer.Trainer(c, str(tmp_path))


@pytest.mark.slow
def test_padded_buckets_train_like_unpadded_ones_with_fewer_compiles(make_config, tmp_path):
  """compile.pad_multiple=16: lengths 8..32 run in 2 buckets instead of 4, the logged tokens,
  seqlens and throughput count real tokens, and the losses are the unpadded run's."""
  plain = trainer.Trainer(make_config(), str(tmp_path / "plain")).run()
  padded_run = trainer.Trainer(make_config(compile__pad_multiple=16), str(tmp_path / "padded"))
  padded = padded_run.run()
  assert sorted((b["batch_size"], b["seqlen"]) for b in padded["buckets"]) == [(4, 16), (4, 32)]
  assert len(plain["buckets"]) == 4
  a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "padded")
  assert [r["seqlen"] for r in b] == [r["seqlen"] for r in a] and b[0]["seqlen"] == 8
  assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
  np.testing.assert_allclose(padded["final_val_loss"], plain["final_val_loss"], rtol=1e-5)


@pytest.mark.slow
def test_a_whole_run_compiles_nothing_twice_and_only_the_plans_buckets(make_config, tmp_path):
  """Every compile of a whole SLW run, counted from JAX's own compile log: each function and
  shape once, the train step exactly at the plan's buckets, executables released as the
  schedule passes their buckets."""
  import logging  # pylint: disable=g-import-not-at-top
  messages = []
  handler = logging.Handler()
  handler.emit = lambda record: messages.append(record.getMessage())
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  jax.config.update("jax_log_compiles", True)  # Global: the compile threads log too.
  try:
    run = trainer.Trainer(make_config(), str(tmp_path))
    summary = run.run()
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(handler)
  # A message names the function, its argument shapes and their shardings or device: the
  # same message twice is the same computation compiled twice.
  compiles = [m for m in messages if m.startswith("Compiling ")]
  assert compiles and len(compiles) == len(set(compiles)), compiles  # Nothing compiled twice.
  steps = [m for m in compiles if m.startswith("Compiling jit(step_fn)")]
  shapes = {tuple(map(int, re.search(r"int32\[(\d+),(\d+)\]", m).groups())) for m in steps}
  assert len(steps) == len(shapes)
  assert shapes == {(b.batch_size, b.seqlen) for b in run.schedule.buckets()}
  assert sum(m.startswith("Compiling jit(eval_fn)") for m in compiles) == 1
  assert sum(m.startswith("Compiling jit(init)") for m in compiles) == 1
  # Only the last bucket was still held.
  assert summary["completed"] and run.executables.num_live <= 1
  assert run.executables.released == len(shapes) - run.executables.num_live


def _count_calls(monkeypatch, owner, name, counts):
  original = getattr(owner, name)

  def counted(*args, **kwargs):
    counts[name] += 1
    return original(*args, **kwargs)
  monkeypatch.setattr(owner, name, staticmethod(counted) if isinstance(owner, type) else counted)


def test_setup_builds_each_part_once(make_config, tmp_path, monkeypatch):
  """Setup reads as one pass: the model config, optimizer, layout, schedule, LRs, data and
  compiled steps are each built once and handed down (no layer rebuilds what it was given)."""
  from slw_jax import models, optim, pacing, sharding  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()
  for owner, name in [(models.GPTConfig, "from_config"), (optim, "make_optimizer"),
                      (sharding, "make_layout"), (pacing, "run_schedule"),
                      (optim, "learning_rates"), (input_pipeline, "open_run_data"),
                      (train_step, "sharded_steps"), (models, "GPT")]:
    _count_calls(monkeypatch, owner, name, counts)
  run = trainer.Trainer(make_config(), str(tmp_path))
  run.setup()
  run.executables.close()
  run.checkpoints.close()
  assert counts == {"from_config": 1, "make_optimizer": 1, "make_layout": 1, "run_schedule": 1,
                    "learning_rates": 1, "open_run_data": 1, "sharded_steps": 1,
                    "GPT": 2}  # Once abstractly (shapes, layout), once by the init step.
