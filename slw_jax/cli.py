"""Shared command-line handling: the --config flag, overrides and one-line errors (exit 2).

Every entry point (`plan`, `main`, `prepare`, ...) parses its flags through `parse_config`,
which loads `--config=configs/<name>.py`, applies `--config.a.b=v` overrides and validates,
all before any model is built. Bad input ends the process with status 2 and one line on
stderr: the bad value and what is allowed, never a traceback. `--help` (or `-h`) on any of them
prints its usage, its flags and an example (`exit_on_help`) and exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import sys
import tempfile
import textwrap

from absl import flags
from ml_collections import config_dict, config_flags

from slw_jax import config_lib, errors
from slw_jax.errors import UsageError

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/tiny.py; override fields with --config.a.b=v.",
    lock_config=True)


WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: metrics, TensorBoard, checkpoints; a directory with "
    "checkpoints resumes (main) or is evaluated (evaluate).")


STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir to read (default: the "
                            "newest).")

# A file where a run directory belongs would otherwise fail later as an OSError about a path
# inside it (checkpoints/, metrics.jsonl), or be mistaken for an existing directory.
flags.register_validator("workdir", lambda path: path is None or not os.path.isfile(path),
                         message="is a file, not a directory")

MIRROR_DIR = flags.DEFINE_string(
    "mirror_dir", None, "Where a gs:// or s3:// --workdir is mirrored on local disk (default "
    "~/.cache/slw_jax/runs); see docs/cloud.md.")

HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "--helpfull")
_CONFIG_OVERRIDES = ("--config.<group>.<field>=<value>: override one config field, e.g. "
                     "--config.optim.lr=3e-4 (repeatable; every field: "
                     "docs/configuration.md). An unknown field is an error.")


@contextlib.contextmanager
def exit_on_bad_input():
  """Turns bad input raised inside the block (`errors.InputError`, absl's flag errors) into
  `error: ...` and exit status 2. Anything else is a bug: it keeps its traceback (status 1)."""
  try:
    yield
  except (errors.InputError, flags.Error) as error:
    print(f"error: {errors.one_line(error)}", file=sys.stderr)
    sys.exit(2)


def writable_directory(path: str, flag: str = "--workdir"):
  """Checks that directory `path` can be created (if missing) and written: a read-only disk or
  a path under a file is bad input, one line naming the flag, before any work (later, the same
  OSError would stop the run as if it were a bug). Nothing is left behind: the probe is a
  temporary file in `path`, or in its nearest existing parent. A URL (gs://, s3://) is
  checked when it is opened (slw_jax.remote_run)."""
  if errors.is_url(path):
    return
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  try:
    if not os.path.isdir(existing):
      raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
    with tempfile.TemporaryFile(dir=existing):
      pass
  except OSError as error:
    raise UsageError(f"{flag}={path} is not a writable directory: "
                     f"{error.strerror or errors.one_line(error)}") from None


def _wrapped(text: str) -> str:
  return textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="      ")


def _flag_line(flag) -> str:
  name = f"[no]{flag.name}" if flag.boolean else flag.name
  if flag.default is None:
    return _wrapped(f"--{name}: {flag.help}")
  default = flag.default_as_str.strip("'")  # absl quotes every default: 'text', '1'.
  return _wrapped(f"--{name}: {flag.help} (default: {default})")


def help_text(module_name: str, example: str, shared=(), usage: str | None = None) -> str:
  """An entry point's help: usage, its docstring, its own flags (those `module_name` defines)
  after the shared ones it takes (`shared`: CONFIG, WORKDIR, STEP), and `example`."""
  module = sys.modules[module_name]
  command = f"python -m {module.__spec__.name}" if module.__spec__ else os.path.basename(
      sys.argv[0])
  own = flags.FLAGS.get_flags_for_module(module)  # `__main__` under `python -m`: absl maps it.
  lines = [f"usage: {usage or command + ' [--flag=value ...]'}", "",
           (module.__doc__ or "").strip(), "", "flags:"]
  for holder in shared:  # First: they say what the command works on.
    lines.append(_flag_line(flags.FLAGS[holder.name]))
    if holder is CONFIG:
      lines.append(_wrapped(_CONFIG_OVERRIDES))
  lines += [_flag_line(flag) for flag in own]
  lines += ["  --help, -h: this message; --helpfull: with absl's own flags too", "",
            f"example:\n  {example}"]
  return "\n".join(lines)


def exit_on_help(argv, module_name: str, example: str, shared=(), usage: str | None = None):
  """Prints `help_text` and exits 0 when argv asks for help (any of HELP_ARGS). Called first by
  every entry point: help must work without the flags a run requires, and absl answers --help
  itself only under absl.app, which we do not use."""
  asked = [arg for arg in argv[1:] if arg in HELP_ARGS]
  if not asked:
    return
  print(help_text(module_name, example, shared, usage))
  if "--helpfull" in asked:
    print("\nevery flag this process defines:" + flags.FLAGS.get_help())
  sys.exit(0)


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
  except flags.CantOpenFlagFileError as error:  # absl's text starts with "ERROR:: ".
    raise UsageError(errors.one_line(error).removeprefix("ERROR:: ")) from None
  except flags.Error as error:
    raise UsageError(errors.one_line(error)) from None


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
    raise UsageError(f"--config={path} could not be loaded: {errors.one_line(error)}") from None
  _check_override_paths(plain, _override_paths(argv))
  positional = parse_flags(argv)[1:]
  if positional:  # E.g. `--memory true` (a bool takes no value): never ignored in silence.
    raise UsageError(f"unexpected argument {positional[0]!r}: flags take the form --name=value "
                     "(see --help)")
  if adjust is not None:
    adjust(CONFIG.value)
  return config_lib.validate(CONFIG.value)
