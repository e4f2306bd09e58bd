"""launch/local.sh's own output: a failed run ends with the failure, not with bash's noise."""

import os
import re
import signal
import subprocess
import sys
import time

from conftest import REPO

# The launcher's summary of a failure: the process (its --process_id), its pid and status.
SUMMARY = re.compile(r"^launch/local\.sh: process (\d) \(pid \d+\) exited with status (\d+); "
                     r"killing the others")


def test_a_bad_config_value_ends_the_launch_with_the_failure_and_its_status(tmp_path):
  """Catches the launcher waiting again on a process it already reaped: bash's own `wait: N:
  no such job` (and a `Killed` notice per process it killed) came after the error line."""
  result = subprocess.run(
      ["launch/local.sh", "2", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
       "--config.batch_size=-1"],  # Refused by every process before it starts JAX.
      cwd=REPO, env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
      text=True, timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert "no such job" not in result.stderr and "Killed" not in result.stderr, result.stderr
  summary = SUMMARY.match(lines[-1])
  assert summary and summary.group(2) == "2", result.stderr
  # The failed process's error comes before it (each process prints its own, their writes may
  # interleave).
  assert ("error: config.batch_size=-1 is invalid: must be an integer >= 1" in
          "\n".join(lines[:-1])), result.stderr


def test_a_run_whose_processes_end_one_after_the_other_ends_silently(tmp_path):
  """Catches the same `wait` on a reaped process in a run that succeeds: `no such job` was
  printed as each process but the last ended. No JAX: a stand-in exits 0, process 1 later."""
  python = tmp_path / "python"
  python.write_text('#!/bin/bash\n[[ " $* " == *" --process_id=1 "* ]] && sleep 0.5\nexit 0\n')
  python.chmod(0o755)
  result = subprocess.run(["launch/local.sh", "3", "--config=configs/tiny.py"], cwd=REPO,
                          env={**os.environ, "PYTHON": str(python)},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_sigterm_to_the_launcher_reaches_every_process_and_is_waited_for(tmp_path):
  """Catches the launcher dying of `set -u` when a trapped signal interrupts `wait -n -p`
  (which unsets the variable): it exited 1 at once, its processes left running unwatched."""
  log = tmp_path / "log"
  python = tmp_path / "python"  # A stand-in that ends on SIGTERM, as slw_jax.main does.
  python.write_text(f"""#!/bin/bash
trap 'kill $!; echo "stopped $*" >> {log}; exit 0' TERM
echo started >> {log}
sleep 60 & wait $!
""")
  python.chmod(0o755)
  launcher = subprocess.Popen(["launch/local.sh", "2", "--config=configs/tiny.py"], cwd=REPO,
                              env={**os.environ, "PYTHON": str(python), "PORT": "1"},
                              stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while time.time() < deadline and (not log.exists() or log.read_text().count("started") < 2):
    time.sleep(0.05)
  launcher.send_signal(signal.SIGTERM)
  _, stderr = launcher.communicate(timeout=30)
  assert launcher.returncode == 0 and stderr == "", stderr
  stopped = sorted(line.split()[-1] for line in log.read_text().splitlines()
                   if line.startswith("stopped"))
  assert stopped == ["--process_id=0", "--process_id=1"]
