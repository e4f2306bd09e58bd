"""Faults in a run of two processes, caused for real: the survivor must exit non-zero within
distributed.timeout_s and its log must name the process that failed.

The processes are started directly, not through launch/local.sh: the launcher kills the others
at the first failure, which would hide what the processes do by themselves (a cluster's
launcher may not).
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

from conftest import REPO, metric_rows
from test_multihost import _cli_args, _env

TIMEOUT_S = 10  # distributed.timeout_s here: short, yet far above a heartbeat's interval.
SLACK_S = 20  # For starting Python and a loaded test machine; far below JAX's default 100 s.


def _start(c, workdir, **overrides) -> list[subprocess.Popen]:
  """Two processes x 4 CPU devices of slw_jax.main, each writing workdir/process<i>.log."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  args = [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          *_cli_args(c, **{"distributed.timeout_s": TIMEOUT_S, **overrides}),
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  os.makedirs(workdir, exist_ok=True)
  processes = []
  for i in range(2):
    with open(os.path.join(workdir, f"process{i}.log"), "w") as log:
      processes.append(subprocess.Popen([*args, f"--process_id={i}"], cwd=REPO, env=_env(4),
                                        stdout=log, stderr=subprocess.STDOUT))
  return processes


def _exit_of(process: subprocess.Popen, since: float) -> tuple[int, float]:
  """(exit status, seconds from `since`); kills it if it outlives the bound under test."""
  try:
    status = process.wait(timeout=TIMEOUT_S + SLACK_S)
  except subprocess.TimeoutExpired:
    process.kill()
    raise AssertionError(f"the survivor still ran {TIMEOUT_S + SLACK_S} s after the fault")
  return status, time.time() - since


def _log(workdir, index: int) -> str:
  return open(os.path.join(workdir, f"process{index}.log")).read()


# How JAX's coordination service names a dead process when it aborts the survivor (which of its
# errors comes first varies: heartbeats, or the survivor's exit barrier): process 1 by its task
# number, process 0 as the leader task.
NAMED = {1: re.compile(r"Task 1 heartbeat timeout|(stopped sending heartbeats\)|timed out task "
                       r"names):\s+1\s"),
         0: re.compile(r"Either the leader task was preempted/died/restarted")}


def _kill_when(processes, victim: int, workdir, ready) -> tuple[int, float, str]:
  """SIGKILLs processes[victim] once `ready()`; (the survivor's exit status, seconds it took to
  exit, its log)."""
  survivor = 1 - victim
  try:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes) and not ready():
      time.sleep(0.05)
    assert all(p.poll() is None for p in processes), _log(workdir, 0)[-3000:]
    processes[victim].send_signal(signal.SIGKILL)
    status, seconds = _exit_of(processes[survivor], time.time())
  finally:
    for p in processes:
      p.kill()
  print(f"process {survivor} exited with status {status} {seconds:.1f} s after process {victim} "
        "was killed")
  return status, seconds, _log(workdir, survivor)


def test_a_process_killed_mid_training_stops_the_other_naming_it(make_config, tmp_path):
  workdir = tmp_path / "run"
  # One bucket (seqlen 32 throughout): one compile, no background compiles on a 2-core machine.
  processes = _start(make_config(), workdir, train_steps=2000, **{
      "pacing.seqlen_start": 32, "checkpoint.every_steps": 5000, "eval.every_steps": 5000})
  # Both train once process 0 logged 3 steps: each step is a collective over both processes.
  status, seconds, log = _kill_when(processes, 1, workdir, lambda: (
      (workdir / "metrics.jsonl").exists() and len(metric_rows(workdir)) >= 3))
  assert status != 0, log[-3000:]
  assert seconds < TIMEOUT_S + SLACK_S
  assert NAMED[1].search(log), log[-3000:]


def test_process_0_killed_while_preparing_data_stops_the_other_at_once(make_config, tmp_path):
  workdir = tmp_path / "run"
  processes = _start(make_config(**{"data.dir": str(tmp_path / "data")}), workdir)
  status, seconds, log = _kill_when(processes, 0, workdir, lambda: (
      "is not prepared yet: preparing it now" in _log(workdir, 0)))
  assert status != 0, log[-3000:]
  assert seconds < SLACK_S  # Process 1 loses the coordinator at once: no timeout to wait for.
  assert NAMED[0].search(log), log[-3000:]


def test_process_0_failing_to_prepare_data_stops_the_other_at_once(make_config, tmp_path):
  corpus = tmp_path / "corpus"  # Corrupt: every document empty. Only process 0 reads it.
  corpus.mkdir()
  for name in ("a.txt", "b.txt"):
    (corpus / name).write_text("")
  c = make_config(**{"data.source": f"files:{corpus}/*.txt", "data.dir": str(tmp_path / "data")})
  workdir = tmp_path / "run"
  start = time.time()
  processes = _start(c, workdir)
  try:
    statuses = [_exit_of(p, start) for p in processes]
  finally:
    for p in processes:
      p.kill()
  first, other = _log(workdir, 0), _log(workdir, 1)
  assert statuses[0][0] != 0 and "every document is empty" in first, first[-3000:]
  assert statuses[1][0] != 0, other[-3000:]
  assert (f"error: process 0 failed while preparing data.dir='{tmp_path / 'data'}' (its log "
          "has the error); process 1 stops too") in other, other[-3000:]
  assert "Terminating process" not in first + other  # Both stopped by themselves.


def test_a_checkpoint_damaged_as_one_process_reads_it_stops_both_moving_nothing(
    make_config, tmp_path):
  """Catches a process falling back by itself to an older checkpoint when only its own
  shards of the newest are damaged (the multi-process branch of Restorer.newest_usable gone):
  process 0 resumed from step 2 and finished while process 1 read step 0 alone, stuck in
  orbax's collectives until JAX aborted both, and no line said why."""
  c = make_config()
  workdir = tmp_path / "run"
  # fsdp over all 8 devices: each process writes (and reads back) its own shards, in its own
  # ocdbt.process_<i> files. One bucket and no periodic eval: few compiles. Checkpoints 0, 2.
  small = {"train_steps": 2, "batch_size": 8, "checkpoint.every_steps": 2,
           "eval.every_steps": 5000, "eval.batches": 1, "pacing.seqlen_start": 32,
           "mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}
  processes = _start(c, workdir, **small)
  try:
    statuses = [p.wait(timeout=600) for p in processes]
  finally:
    for p in processes:
      p.kill()
  assert statuses == [0, 0], _log(workdir, 0)[-3000:] + _log(workdir, 1)[-3000:]
  checkpoints = workdir / "checkpoints"
  saved = sorted(os.listdir(checkpoints))
  assert saved == ["0", "2"], saved
  shards = checkpoints / "2" / "state" / "ocdbt.process_1" / "d"  # Process 1's alone.
  damaged = max(shards.iterdir(), key=lambda f: f.stat().st_size)
  size = damaged.stat().st_size // 2
  os.truncate(damaged, size)

  processes = _start(c, workdir, **small)
  try:
    deadline = time.time() + 300  # Starting, compiling (from the cache) and reading step 2.
    while (time.time() < deadline and all(p.poll() is None for p in processes) and
           "does not fall back" not in _log(workdir, 1)):
      time.sleep(0.05)
    seen = time.time()
    statuses = [_exit_of(p, seen) for p in processes]
  finally:
    for p in processes:
      p.kill()
  log0, log1 = _log(workdir, 0), _log(workdir, 1)
  print(f"exit statuses {[s for s, _ in statuses]}, "
        f"{', '.join(f'{t:.1f}' for _, t in statuses)} s after process 1's error")
  named = [line for line in log1.splitlines()
           if "with several processes the run does not fall back by itself" in line]
  assert len(named) == 1, log1[-3000:]
  assert named[0].startswith(f"error: checkpoint 2 in {checkpoints} is damaged as process 1 "
                             "reads it"), named[0]
  assert all(status != 0 for status, _ in statuses), (log0[-3000:], log1[-3000:])
  assert "damaged as process 0" not in log0, log0[-3000:]  # The damage is one process's.
  for log in (log0, log1):
    assert "resumed from step" not in log and "is unreadable" not in log, log[-3000:]
  # Nothing deleted or moved: the damaged checkpoint is still the newest, as it was.
  assert sorted(os.listdir(checkpoints)) == saved
  assert not (workdir / "unreadable_checkpoints").exists()
  assert damaged.stat().st_size == size
