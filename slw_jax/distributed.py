"""Joining a multi-process run: `jax.distributed` setup, before anything touches a device.

A process is one of several when it is told so (flags, or the SLW_* environment variables the
launch scripts set; in a Kubernetes Indexed Job the process id defaults to the pod's
JOB_COMPLETION_INDEX), when SLW_DISTRIBUTED=auto asks JAX to detect the cluster itself (TPU VM
slices: launch/tpu_vm.sh), or when it runs under a cluster detected here: a SLURM job step with
more than one task, or a TPU slice with several workers. Anything else is a single-process run
and starts no coordinator.
"""

from __future__ import annotations

import itertools
import os
import signal
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from slw_jax import errors

ENV = {"coordinator_address": "SLW_COORDINATOR_ADDRESS", "num_processes": "SLW_NUM_PROCESSES",
       "process_id": "SLW_PROCESS_ID"}


class DistributedError(errors.InputError):
  """Inconsistent multi-process settings (one line: what is wrong, what is allowed)."""


class ProcessFailed(DistributedError):
  """Another process of the run failed; the message names it. (An InputError like the settings
  errors, so that main.py prints it as one line: that process printed its own error.)"""


def _explicit(coordinator_address, num_processes, process_id) -> dict:
  """The explicit settings, flags first then environment; {} when none is given."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  for key, env in ENV.items():
    if given[key] in (None, "") and os.environ.get(env):
      given[key] = os.environ[env]
  if all(v in (None, "") for v in given.values()):
    return {}
  if given["process_id"] in (None, "") and os.environ.get("JOB_COMPLETION_INDEX"):
    given["process_id"] = os.environ["JOB_COMPLETION_INDEX"]  # A Kubernetes Indexed Job's pod.
  missing = [f"--{k} (or {ENV[k]})" for k, v in given.items() if v in (None, "")]
  if missing:
    raise DistributedError(f"multi-process run needs {', '.join(missing)} as well")
  try:
    count, index = int(given["num_processes"]), int(given["process_id"])
  except ValueError:
    raise DistributedError(f"--num_processes={given['num_processes']!r} and --process_id="
                           f"{given['process_id']!r} must be integers") from None
  if count < 1 or not 0 <= index < count:
    raise DistributedError(f"--process_id={index} must be in [0, --num_processes={count})")
  host, _, port = str(given["coordinator_address"]).rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address={given['coordinator_address']!r} must be "
                           "HOST:PORT, e.g. 10.0.0.1:1234")
  return {"coordinator_address": given["coordinator_address"], "num_processes": count,
          "process_id": index}


def detected_cluster() -> str | None:
  """The kind of multi-process cluster JAX can configure itself on, if this is one."""
  if os.environ.get("SLW_DISTRIBUTED") == "auto":
    return "auto"
  # SLURM_STEP_NUM_TASKS exists only inside an srun step: a plain command in a multi-task
  # allocation stays a single process.
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
    return "slurm"
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  return None


DEFAULT_TIMEOUT_S = 100  # JAX's own heartbeat timeout (config.distributed.timeout_s).
JOIN_TIMEOUT_S = 300  # JAX's default wait for every process to join.


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> str:
  """Starts `jax.distributed` when needed; returns how: "explicit", "auto", "slurm", "tpu" or
  "single".

  Must run before the first JAX computation (it fixes the set of devices every process sees).
  Within `timeout_s` seconds of a process dying or falling silent, JAX's coordination service
  aborts every other one, naming it ("Task 1 heartbeat timeout"; a dead process 0 is "the
  leader task"); a process that exits waits as long for the others to exit too.
  """
  timeouts = {"heartbeat_timeout_seconds": timeout_s, "shutdown_timeout_seconds": timeout_s,
              # The processes of one job may start minutes apart (pods pulling an image).
              "initialization_timeout": max(timeout_s, JOIN_TIMEOUT_S)}
  settings = _explicit(coordinator_address, num_processes, process_id)
  if settings:
    if settings["num_processes"] == 1:
      return "single"
    jax.distributed.initialize(**settings, **timeouts)
    return "explicit"
  cluster = detected_cluster()
  if cluster is None:
    return "single"
  jax.distributed.initialize(local_device_ids=_slurm_local_devices() if cluster == "slurm"
                             else None, **timeouts)  # JAX reads the rest from the cluster.
  return cluster


def _slurm_local_devices() -> list[int] | None:
  """Every GPU of the node when SLURM runs one task per node. (JAX alone would give each
  process only the GPU numbered by its local task id, i.e. GPU 0.) None: one task per GPU."""
  tasks_per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0]
  gpus = os.environ.get("SLURM_GPUS_ON_NODE") or str(
      len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]))
  if tasks_per_node != "1" or not gpus.isdigit() or int(gpus) < 1:
    return None
  return list(range(int(gpus)))


def first_process_does(work: Callable[[], object], what: str):
  """Runs `work()` on process 0 while the others wait; a failure there stops every process at
  once (not after `timeout_s`): process 0 re-raises its error, the others raise ProcessFailed
  naming process 0 and `what` it was doing."""
  error = None
  if jax.process_index() == 0:
    try:
      work()
    except Exception as e:  # pylint: disable=broad-except  # Re-raised once the others know.
      error = e
  # A collective over every process: the barrier, and process 0's verdict in one.
  ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
  if error is not None:
    raise error
  if not ok:
    raise ProcessFailed(f"process 0 failed while {what} (its log has the error); process "
                        f"{jax.process_index()} stops too")


def everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective: call it on all of them)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def gather(value: int) -> list[int]:
  """`value` of every process, in process order (a collective)."""
  if jax.process_count() == 1:
    return [value]
  return np.asarray(multihost_utils.process_allgather(np.int64(value))).ravel().tolist()


# Calls of stop_agreed in this process: the same sequence on every process, whatever step a run
# resumed from (JAX's preemption sync point is one more than the highest value any process
# passed when the notice arrived, and only that exact value reaches it).
_stop_checks = itertools.count(1)
_signal_passed_on = False  # JAX notices one SIGTERM per process: ours is passed on once.


def stop_agreed(asked: bool) -> bool:
  """Whether every process stops now: True at the same call on every process, once a SIGTERM
  reached any of them, or `asked` (this process got another signal) was passed on.

  Call once before launching each step, on every process. JAX's preemption sync (its SIGTERM
  notifier and the coordination service; no device work, so the training loop keeps its step
  in flight) does the agreeing: SIGTERM must be left to JAX's handler (no Python one), and
  `asked` reaches it as a SIGTERM to this process. A dead coordinator aborts the process (JAX's
  error polling): it never reads as "nobody asked".
  """
  global _signal_passed_on
  if jax.process_count() == 1:
    return asked
  # First: it raises if JAX's preemption service is off, before a SIGTERM nobody handles.
  reached = multihost_utils.reached_preemption_sync_point(next(_stop_checks))
  if asked and not _signal_passed_on:
    _signal_passed_on = True
    os.kill(os.getpid(), signal.SIGTERM)
  return reached
