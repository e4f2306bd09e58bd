"""Every entry point answers --help (and -h, --helpfull) with its usage, its flags and an
example, exit status 0, even though a run needs flags that are not given."""

import importlib
import importlib.util
import re
import subprocess
import sys

import pytest
from absl import flags

import harness
from conftest import REPO

# Entry point: the shared flags (slw_jax.cli) it takes. Its own flags are whatever it defines.
ENTRY_POINTS = {
    "main": ["config", "workdir", "mirror_dir"],
    "plan": ["config"],
    "prepare": ["config"],
    "evaluate": ["workdir", "step", "mirror_dir"],
    "convert": ["config", "workdir", "step", "mirror_dir"],
    "report": ["mirror_dir"],
    "tune": ["config", "workdir", "mirror_dir"],
}
SCRIPTS = {  # Scripts run by path, with argparse: their options.
    "experiments/stability/run.py": ["--preset", "--quick", "--lrs", "--arms", "--seeds",
                                     "--noise-seeds", "--max-seeds", "--out", "--results",
                                     "--analyse", "--smoke", "--set"],
    "experiments/stability/find_regime.py": ["--batches", "--lrs", "--steps", "--slw_steps"],
}


def _help(entry: str, arg: str, capsys) -> str:
  module = importlib.import_module(f"slw_jax.{entry}")
  capsys.readouterr()
  result = harness.call(module.main, [f"slw_jax.{entry}", arg])
  out, err = capsys.readouterr()
  assert (result.code, err) == (0, ""), err
  return out


def _listed(text: str) -> set[str]:
  """The flag names the help's flag lines start with."""
  return set(re.findall(r"^  --(?:\[no\])?(\w+)[:,]", text, flags=re.MULTILINE))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_lists_usage_every_flag_and_an_example(entry, capsys):
  text = _help(entry, "--help", capsys)
  module = sys.modules[f"slw_jax.{entry}"]
  own = {flag.name for flag in flags.FLAGS.get_flags_for_module(module)}
  assert text.startswith(f"usage: python -m slw_jax.{entry} ")
  assert module.__doc__.strip() in text
  assert _listed(text) == own | set(ENTRY_POINTS[entry]) | {"help"}
  assert ("--config.<group>.<field>=<value>" in text) == ("config" in ENTRY_POINTS[entry])
  example = re.search(r"^example:\n  (.+)$", text, flags=re.MULTILINE).group(1)
  assert example.startswith(f"python -m slw_jax.{entry} ")
  assert set(re.findall(r"--(\w+)=", example)) <= _listed(text)  # It uses only real flags.


@pytest.mark.parametrize("arg", ["-h", "-help", "--helpshort", "--helpfull"])
def test_other_spellings_of_help(arg, capsys):
  text = _help("evaluate", arg, capsys)
  assert text.startswith("usage: python -m slw_jax.evaluate ") and "--task" in text
  assert ("every flag this process defines" in text) == (arg == "--helpfull")


def test_help_wins_over_bad_flags(capsys):
  assert "--every" in _help("plan", "--help", capsys)
  out = harness.call(importlib.import_module("slw_jax.plan").main,
                     ["slw_jax.plan", "--bogus", "--config=missing.py", "--help"])
  assert out.code == 0 and "--every" in capsys.readouterr().out


def test_python_dash_m_help():
  """Under `python -m` the module is `__main__`: its own flags are still found."""
  result = subprocess.run([sys.executable, "-m", "slw_jax.main", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert (result.returncode, result.stderr) == (0, "")
  assert result.stdout.startswith("usage: python -m slw_jax.main ")
  assert {"coordinator_address", "num_processes", "process_id"} <= _listed(result.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help(script, capsys, monkeypatch):
  spec = importlib.util.spec_from_file_location("help_of_" + script.split("/")[-1][:-3],
                                                REPO / script)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, module)  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  monkeypatch.setattr(sys, "argv", [script, "--help"])
  with pytest.raises(SystemExit) as stop:
    module.main()
  text = capsys.readouterr().out
  assert stop.value.code == 0 and text.startswith("usage: ")
  assert all(option in text for option in SCRIPTS[script])
  assert f"example: python {script} " in text
