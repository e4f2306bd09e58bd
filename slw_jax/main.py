"""`python -m slw_jax.main --config=configs/<name>.py --workdir=DIR [--config.a.b=v ...]`

Several processes (launch/*): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or the SLW_* variables), or run under SLURM / a TPU pod, which are detected.
"""

import sys

from absl import flags

from slw_jax import cli

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's "
                                   "coordinator (multi-process runs); env SLW_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run; env "
                                      "SLW_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index; env SLW_PROCESS_ID.")


def main(argv=None):
  argv = sys.argv if argv is None else argv
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not cli.WORKDIR.value:
      raise cli.UsageError("--workdir is required: the run directory, e.g. --workdir=runs/tiny")
    if cli.STEP.value is not None:
      raise cli.UsageError(f"--step={cli.STEP.value} is for evaluate and convert: main always "
                           "resumes from the newest checkpoint of --workdir")
    from slw_jax import distributed, hardware, trainer  # pylint: disable=g-import-not-at-top
    hardware.use_gpu_memory_fraction()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=config.distributed.timeout_s)
    try:
      run = trainer.Trainer(config, cli.WORKDIR.value)  # Checks mesh, data and config ...
      run.setup()  # ... memory, and the checkpoint to resume: all before step 0.
    except trainer.StopTraining as error:
      raise cli.UsageError(str(error)) from None
  try:
    summary = run.run()
  except trainer.StopTraining as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if summary["completed"] or summary["stopped_by"] else 1)


if __name__ == "__main__":
  main()
