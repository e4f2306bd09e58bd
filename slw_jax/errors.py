"""Bad input has one type, `InputError`; anything else raised is a bug and keeps its traceback.

Every entry point runs its setup inside `cli.exit_on_bad_input`, which turns an `InputError`
(a wrong config value, flag, data file, checkpoint or tokenizer: the message names the value
and what is allowed) into one line, `error: ...`, and exit status 2. A `ValueError` or
`TypeError` from JAX or from our own code is not caught there: it ends the process with its
traceback and status 1, so a bug never reads as if the user had typed a wrong flag.

`InputError` is a `ValueError`, so code that validates values can be tested with
`pytest.raises(ValueError)` as before. This module imports nothing from the package: every
module may raise these errors without an import circle.
"""

from __future__ import annotations

import re


class InputError(ValueError):
  """Bad input: a config, flag, data file, checkpoint or tokenizer the user gave. One line."""


class ConfigError(InputError):
  """A bad config value: the message names the field, the value and what is allowed."""


class UsageError(InputError):
  """A bad flag or file given on the command line."""


class StopTraining(RuntimeError):
  """The run cannot continue (e.g. too many rollbacks, or its largest bucket does not fit the
  device); checkpoints are kept. Not bad input as such: the trainer names the cause and the
  settings that would fix it, and main prints it as one line."""


def config_fail(field: str, value, allowed: str):
  """Raises the ConfigError of `config.FIELD=VALUE`, saying what is allowed."""
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def config_check(ok: bool, field: str, value, allowed: str):
  if not ok:
    config_fail(field, value, allowed)


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path) -> bool:
  """gs://, s3://, http:// ...: a path that no local file call can use."""
  return isinstance(path, str) and bool(URL.match(path))


def one_line(error: BaseException, limit: int = 400) -> str:
  """An error's message on one line, cut at `limit` characters (for `error: ...` lines)."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + " ..."
