"""Joining a multi-process run: `jax.distributed` setup, before anything touches a device.

A process is one of several when it is told so (flags, or the SLW_* environment variables the
launch scripts set; in a Kubernetes Indexed Job the process id defaults to the pod's
JOB_COMPLETION_INDEX), when SLW_DISTRIBUTED=auto asks JAX to detect the cluster itself (TPU VM
slices: launch/tpu_vm.sh), or when it runs under a cluster detected here: a SLURM job step with
more than one task, or a TPU slice with several workers. Anything else is a single-process run
and starts no coordinator.
"""

from __future__ import annotations

import os

import jax

ENV = {"coordinator_address": "SLW_COORDINATOR_ADDRESS", "num_processes": "SLW_NUM_PROCESSES",
       "process_id": "SLW_PROCESS_ID"}


class DistributedError(ValueError):
  """Inconsistent multi-process settings (one line: what is wrong, what is allowed)."""


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


def initialize(coordinator_address=None, num_processes=None, process_id=None) -> str:
  """Starts `jax.distributed` when needed; returns how: "explicit", "auto", "slurm", "tpu" or
  "single".

  Must run before the first JAX computation (it fixes the set of devices every process sees).
  """
  settings = _explicit(coordinator_address, num_processes, process_id)
  if settings:
    if settings["num_processes"] == 1:
      return "single"
    jax.distributed.initialize(**settings)
    return "explicit"
  cluster = detected_cluster()
  if cluster is None:
    return "single"
  jax.distributed.initialize(local_device_ids=_slurm_local_devices() if cluster == "slurm"
                             else None)  # JAX reads the rest from the cluster's environment.
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


STOP_KEY = "slw_jax/stop_before_step"


def agree_stop_step(requested: int | None) -> int | None:
  """The step before which every process stops, once any process has asked (else None).

  A process that got a signal asks with a step it knows no process has launched yet; the first
  request wins. Uses the coordinator's key-value store (no device work, so the training loop
  keeps one step in flight); JAX has no public handle on it.
  """
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if requested is not None:
    try:
      client.key_value_set(STOP_KEY, str(requested))
    except Exception:  # pylint: disable=broad-except
      pass  # Another process asked first: its step stands.
  try:
    return int(client.key_value_try_get(STOP_KEY))
  except Exception:  # pylint: disable=broad-except  # Not set: nobody asked.
    return None
