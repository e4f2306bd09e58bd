"""A disk that fills up under a run, then turns read-only: one clear error line each time, and
the checkpoints written before stay whole and loadable.

The disk is a small tmpfs mounted for the test where this machine allows mounting (root, as
in CI's containers); elsewhere the run's file size limit (RLIMIT_FSIZE) is lowered once it has
saved some checkpoints, so its next checkpoint cannot be written (EFBIG instead of ENOSPC).
"""

import contextlib
import os
import re
import resource
import subprocess
import sys
import time

import pytest

from runs import command, finish, start
from slw_jax import checkpoint

FULL = r"(No space left on device|File too large)"
# A checkpoint save names the newest intact checkpoint one way, a failed metrics/events write
# (which of the two the disk fills first depends on timing) the other.
ERROR = (r"^error: could not (save checkpoint [\d, ]+|write the run's outputs) in .*" + FULL +
         r".*(intact \((newest: step|the complete checkpoints)|the complete checkpoints "
         r"\(newest: step \d+\) are intact)")


@contextlib.contextmanager
def small_disk(path, size: str):
  """Mounts a tmpfs of `size` at `path`; yields False (nothing mounted) where not allowed."""
  os.makedirs(path)
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                             capture_output=True, check=False).returncode == 0
  except OSError:  # No mount command.
    mounted = False
  try:
    yield mounted
  finally:
    if mounted:
      subprocess.run(["umount", "-l", path], check=False)


def _complete_steps(workdir) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


def _fill_up(make_config, workdir, mounted: bool) -> str:
  """Runs until the disk is full; returns the output. Every 2 steps a checkpoint, none deleted
  (checkpoint.keep): the tmpfs fills, or the lowered file size limit stops the next save."""
  process = start(command(make_config, workdir, checkpoint__every_steps=2,
                          checkpoint__keep=1000), {"SLW_FAULT_POISON": ""})
  if not mounted:
    deadline = time.time() + 240
    while len(_complete_steps(workdir)) < 3 and process.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  output = finish(process)
  assert process.returncode == 1, output
  return output


# Run before a command, as root: drops from the capability bounding set what lets root read and
# write files whatever their modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), then
# execs the command, which then meets file modes as their owner does.
DROP_FILE_ACCESS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2, 3):
  if libc.prctl(24, capability, 0, 0, 0):  # PR_CAPBSET_DROP
    sys.exit(f"cannot drop capability {capability}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def _without_root_file_access(read_only_dir) -> list[str]:
  """The command prefix that runs a command as root without its file-mode override (checked:
  it cannot write `read_only_dir`, mode 0o555); skips the test, saying why, where this machine
  does not allow dropping it."""
  probe = subprocess.run([sys.executable, "-c", DROP_FILE_ACCESS, sys.executable, "-c",
                          f"import os; print(os.access({str(read_only_dir)!r}, os.W_OK))"],
                         capture_output=True, text=True, check=False)
  if probe.returncode != 0 or probe.stdout.strip() != "False":
    pytest.skip("the read-only start needs a read-only disk: root here can neither mount a "
                f"tmpfs nor drop CAP_DAC_OVERRIDE ({(probe.stderr or probe.stdout).strip()})")
  return [sys.executable, "-c", DROP_FILE_ACCESS]


def test_a_full_then_read_only_disk_stops_the_run_with_one_line_and_checkpoints_intact(
    make_config, tmp_path):
  workdir = str(tmp_path / "disk" / "run")
  with small_disk(str(tmp_path / "disk"), "2m") as mounted:
    output = _fill_up(make_config, workdir, mounted)
    assert re.match(ERROR, output.strip().splitlines()[-1]), output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("error")] == [
        output.strip().splitlines()[-1]], output[-3000:]
    # orbax's own log (tracebacks of its writer threads) goes to orbax.log, not the terminal.
    # (tensorstore's threads may still print "Event loop is closed" tracebacks after a failed
    # save, on their own: not ours to silence.)
    assert "ERROR:absl" not in output, output[-3000:]
    saved = _complete_steps(workdir)
    assert len(saved) >= 2, output[-3000:]
    loaded = checkpoint.load_params(workdir)  # The newest reads back whole.
    assert loaded.step == saved[-1]
    # Now not writable at all: the next start says so in one line and changes nothing. The
    # tmpfs is remounted read-only where it could be mounted; elsewhere the files' modes are
    # made read-only, and root, which ignores them, starts without the capabilities to.
    prefix = []
    if mounted:
      subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
    else:
      for root, dirs, files in os.walk(workdir):
        for name in dirs + files + [""]:
          os.chmod(os.path.join(root, name), 0o555)
      if os.geteuid() == 0:
        prefix = _without_root_file_access(workdir)
    process = start(prefix + command(make_config, workdir), {"SLW_FAULT_POISON": ""})
    output = finish(process)
    assert process.returncode != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    # slw_jax.main's check of --workdir, before any work (not a later write failing).
    assert len(errors) == 1 and re.match(r"error: --workdir=.* is not a writable directory: "
                                         "(Read-only file system|Permission denied)$",
                                         errors[0]), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert _complete_steps(workdir) == saved

