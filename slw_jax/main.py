"""`python -m slw_jax.main --config=configs/<name>.py --workdir=DIR [--config.a.b=v ...]`"""

import sys

from absl import flags

from slw_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, TensorBoard, "
                               "checkpoints; a directory with checkpoints resumes.")


def main(argv=None):
  argv = sys.argv if argv is None else argv
  with cli.exit_on_bad_input():
    config = cli.parse_config(argv)
    if not _WORKDIR.value:
      raise cli.UsageError("--workdir is required: the run directory, e.g. --workdir=runs/tiny")
    from slw_jax import trainer  # pylint: disable=g-import-not-at-top
    try:
      run = trainer.Trainer(config, _WORKDIR.value)  # Checks data and config ...
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
