"""Shared command-line handling: the --config flag, overrides and one-line errors (exit 2).

Every entry point (`plan`, `main`, `prepare`, ...) parses its flags through `parse_config`,
which loads `--config=configs/<name>.py`, applies `--config.a.b=v` overrides and validates,
all before any model is built. Bad input ends the process with status 2 and one line on
stderr: the bad value and what is allowed, never a traceback.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys

from absl import flags
from ml_collections import config_dict, config_flags

from slw_jax import config_lib

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py; override fields with --config.a.b=v.",
    lock_config=True)


WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: metrics, TensorBoard, checkpoints; a directory with "
    "checkpoints resumes (main) or is evaluated (evaluate).")


STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir to read (default: the "
                            "newest).")


class UsageError(ValueError):
  """A bad flag or file given on the command line."""


one_line = config_lib.one_line


@contextlib.contextmanager
def exit_on_bad_input():
  """Turns bad-input errors raised inside the block into `error: ...` and exit status 2."""
  try:
    yield
  except (ValueError, TypeError, flags.Error, OSError) as error:
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(2)


def _override_paths(argv) -> list[str]:
  """The dotted field paths of every --config.a.b=v argument."""
  paths = []
  for arg in argv[1:]:
    if arg.startswith("--config.") or arg.startswith("-config."):
      paths.append(arg.split("=", 1)[0].split("config.", 1)[1])
  return paths


def _check_override_paths(config: config_dict.ConfigDict, paths: list[str]):
  """Names the first override that is not a config key, with the keys allowed there."""
  for path in paths:
    node, walked = config, "config"
    for name in path.split("."):
      if not isinstance(node, config_dict.ConfigDict):
        raise UsageError(f"--config.{path} is not a config key: {walked} is a value, not a group")
      if name not in node:
        raise UsageError(f"--config.{path} is not a config key: {walked} has no field {name!r} "
                         f"(allowed: {', '.join(sorted(node.keys()))})")
      node, walked = node[name], f"{walked}.{name}"


def parse_flags(argv) -> list[str]:
  """Parses every flag in `argv` (entry points without a --config); returns the positional
  arguments. Raises UsageError for an unknown or malformed flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    raise UsageError(one_line(error)) from None


def config_path(argv) -> str | None:
  """The value of --config=PATH (or --config PATH) in argv, if any."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        return arg[len(prefix):]
  return None


def parse_config(argv, adjust=None) -> config_dict.FrozenConfigDict:
  """Parses flags in `argv` and returns the validated config. Raises on bad input.

  `adjust(config)`, if given, edits the loaded and overridden config before it is validated.
  """
  path = config_path(argv)
  if not path:
    raise UsageError("--config is required: pass a config file such as --config=configs/tiny.py")
  if not os.path.isfile(path):
    known = ", ".join(sorted(glob.glob("configs/*.py"))) or "none found under ./configs"
    raise UsageError(f"--config={path} is invalid: no such file (config files: {known})")
  try:
    plain = config_lib.load_config_file(path)
  except Exception as error:  # The config file itself failed to import or run.
    raise UsageError(f"--config={path} could not be loaded: {one_line(error)}") from None
  _check_override_paths(plain, _override_paths(argv))
  parse_flags(argv)
  if adjust is not None:
    adjust(CONFIG.value)
  return config_lib.validate(CONFIG.value)
