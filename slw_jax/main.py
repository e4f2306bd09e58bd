"""`python -m slw_jax.main --config=configs/<name>.py --workdir=DIR [--config.a.b=v ...]`

Several processes (launch/*): add --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or the SLW_* variables), or run under SLURM / a TPU pod, which are detected.
"""

import logging
import os
import sys

from absl import flags

from slw_jax import cli, errors

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's "
                                   "coordinator (multi-process runs); env SLW_COORDINATOR_ADDRESS.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run; env "
                                      "SLW_NUM_PROCESSES.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index; env SLW_PROCESS_ID.")
_ALLOW_SCHEDULE_CHANGE = flags.DEFINE_bool(
    "allow_schedule_change", False, "Resume checkpoints saved under another recipe (batch "
    "size, token budget, pacing, optimizer, seed), recorded as an event; without it such a "
    "resume stops naming the field.")


EXAMPLE = "python -m slw_jax.main --config=configs/tiny.py --workdir=runs/tiny"


def main(argv=None):
  argv = sys.argv if argv is None else argv
  cli.exit_on_help(argv, __name__, EXAMPLE, (cli.CONFIG, cli.WORKDIR, cli.MIRROR_DIR))
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not cli.WORKDIR.value:
      raise errors.UsageError("--workdir is required: the run directory, e.g. --workdir=runs/tiny")
    if cli.STEP.value is not None:
      raise errors.UsageError(f"--step={cli.STEP.value} is for evaluate and convert: main always "
                              "resumes from the newest checkpoint of --workdir")
    cli.writable_directory(cli.WORKDIR.value)
    from slw_jax import distributed, hardware, remote_run, trainer  # pylint: disable=g-import-not-at-top
    hardware.use_gpu_memory_fraction()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=config.distributed.timeout_s)
    run_dir = remote_run.open_run(cli.WORKDIR.value, cli.MIRROR_DIR.value)  # A URL: mirrored.
    try:
      run = trainer.Trainer(config, run_dir.local,  # Checks mesh, data and config ...
                            allow_schedule_change=_ALLOW_SCHEDULE_CHANGE.value)
      _orbax_log_to_file(run_dir.local)  # The workdir exists once the Trainer is made.
      run.setup()  # ... memory, and the checkpoint to resume: all before step 0.
    except errors.StopTraining as error:
      raise errors.UsageError(str(error)) from None
  from slw_jax import checkpoint  # pylint: disable=g-import-not-at-top
  run_dir.sync_in_background(config.checkpoint.upload_every_s)
  try:
    summary = run.run()
  except (errors.StopTraining, checkpoint.SaveError, OSError) as error:  # E.g. a full disk.
    _fail(error, run_dir)
  try:
    run_dir.close()  # The last copy to the bucket (waited for: the final save is in it).
  except errors.StopTraining as error:
    _fail(error)
  status = 0 if summary["completed"] or summary["stopped_by"] else 1
  if summary["left_running"]:  # Past a stop's deadline: a compile, or a save abandoned.
    print(f"exiting without waiting for {', '.join(summary['left_running'])}: checkpoint."
          "preemption_timeout_s has passed", file=sys.stderr)
    _exit_now(status, shutdown=True)
  sys.exit(status)  # Every thread was joined: a normal exit (atexit handlers run).


def _fail(error: Exception, run_dir=None):
  """Prints the error that stopped the run (ours: whole, one line), copies what the run left
  to its bucket (a URL --workdir) and exits 1. The saves that could finish did
  (Trainer._abort): orbax's failed writer threads would abort the interpreter's shutdown."""
  print(f"error: {errors.one_line(error, 2000)}", file=sys.stderr)
  if run_dir is not None:
    try:
      run_dir.close()
    except errors.StopTraining as failure:
      print(f"error: {errors.one_line(failure, 2000)}", file=sys.stderr)
  _exit_now(1)


def _orbax_log_to_file(workdir: str):
  """orbax logs through absl, with tracebacks from its writer threads when a save fails; the
  run reports such a failure itself, in one line (checkpoint.SaveError). Its warnings and
  errors go to DIR/orbax.log instead of the terminal (kept: e.g. old checkpoints it could not
  delete)."""
  handler = _QuietFileHandler(os.path.join(workdir, "orbax.log"), delay=True)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(handler)
  absl_logger.propagate = False


class _QuietFileHandler(logging.FileHandler):
  """Drops what it cannot write: the log may be on the disk that just failed, and an error
  raised from a log call would break the caller (orbax's writer threads)."""

  def emit(self, record):
    try:
      super().emit(record)
    except Exception:  # pylint: disable=broad-except  # Opening the file failed.
      pass

  def handleError(self, record):  # Writing failed: logging would print a traceback.
    del record


def _exit_now(status: int, shutdown: bool = False):
  """Exits without waiting for threads still in native code, which cannot be interrupted (a
  compile past a stop's deadline, orbax's writer of an abandoned or failed save): the
  interpreter's shutdown would wait on them, or abort the process (SIGABRT) when they wake up
  after it. `shutdown`: leave the other processes of the run cleanly first."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    if shutdown and jax.process_count() > 1:
      jax.distributed.shutdown()
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
