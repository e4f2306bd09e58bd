"""Two processes x 4 CPU devices (launch/local.sh) train like one process with 8, and their
checkpoint resumes in one process with 4 devices (elastic resume onto another mesh)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import yaml

from conftest import REPO, TEST_RUN, metric_rows
from slw_jax import trainer

# Fixed LR decay: the schedule must not depend on where each run stops.
RUN = {"train_steps": 9, "optim.decay_tokens": 4000, "checkpoint.every_steps": 3,
       "eval.every_steps": 3}


def _cli_args(c, **overrides):
  values = {**TEST_RUN, **RUN, "data.source": c.data.source, "data.dir": c.data.dir,
            "compile.cache_dir": c.compile.cache_dir, **overrides}
  return [f"--config.{k}={v}" for k, v in values.items() if v is not None]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return env


def _launch_two(c, workdir, **overrides) -> subprocess.CompletedProcess:
  """launch/local.sh with 2 processes x 4 devices, run to its end (exit 0)."""
  result = subprocess.run(
      ["launch/local.sh", "2", "--config=configs/tiny.py", f"--workdir={workdir}",
       *_cli_args(c, **overrides)],
      cwd=REPO, env={**_env(8), "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_two_processes_match_one_and_resume_elsewhere(make_config, tmp_path):
  c = make_config(**RUN)
  trainer.Trainer(c, str(tmp_path / "one")).run()  # 1 process x 8 devices, 9 steps.
  reference = [r["loss"] for r in metric_rows(tmp_path / "one")]

  two = tmp_path / "two"
  result = _launch_two(c, two, train_steps=6)
  assert "in 2 process(es)" in result.stdout
  np.testing.assert_allclose([r["loss"] for r in metric_rows(two)], reference[:6], rtol=1e-5)
  assert "6" in os.listdir(two / "checkpoints")

  # The same run continues in one process with 4 devices (data=2 x tensor=2).
  result = subprocess.run(
      [sys.executable, "-m", "slw_jax.main", "--config=configs/tiny.py", f"--workdir={two}",
       "--allow_schedule_change", *_cli_args(c, **{"mesh.data": 2})],  # Longer: 9 steps.
      cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from step 6" in result.stdout
  assert "a changed recipe (--allow_schedule_change): train_steps=6 there, 9 here" in result.stdout
  assert "over 4 devices in 1 process(es)" in result.stdout
  rows = metric_rows(two)
  assert [r["step"] for r in rows] == list(range(9))
  np.testing.assert_allclose([r["loss"] for r in rows], reference, rtol=1e-5)


def test_two_processes_take_the_same_adaptive_decisions_as_one(make_config, tmp_path):
  """The decisions read global metrics: 2 processes x 4 devices decide (and train) as 1 x 8,
  and each process checks at the end that the others decided the same."""
  adaptive = {"pacing.kind": "adaptive", "pacing.adaptive.every_steps": 2,
              "pacing.adaptive.deadline_fraction": 0.75, "train_steps": 12}
  c = make_config(**{k.replace(".", "__"): v for k, v in {**RUN, **adaptive}.items()})
  one = trainer.Trainer(c, str(tmp_path / "one")).run()
  two = tmp_path / "two"
  result = _launch_two(c, two, **adaptive)
  changes = one["pacing"]["changes"]
  assert len(changes) > 1
  assert (f"adaptive pacing: the 2 processes took the same {len(changes) - 1} length change(s)"
          in result.stdout)
  assert json.load(open(two / "summary.json"))["pacing"]["changes"] == changes
  rows = metric_rows(two)
  assert [r["seqlen"] for r in rows] == [r["seqlen"] for r in metric_rows(tmp_path / "one")]
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in metric_rows(tmp_path / "one")], rtol=1e-5)


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(make_config, tmp_path):
  c = make_config()
  workdir = tmp_path / "run"
  launcher = subprocess.Popen(
      ["launch/local.sh", "2", "--config=configs/tiny.py", f"--workdir={workdir}",
       *_cli_args(c, train_steps=2000, **{"checkpoint.every_steps": 5000,
                                          "eval.every_steps": 5000})],
      cwd=REPO, env={**_env(8), "DEVICES_PER_PROCESS": "4", "PYTHON": sys.executable},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and launcher.poll() is None:
    if (workdir / "metrics.jsonl").exists() and len(metric_rows(workdir)) >= 10:
      break
    time.sleep(0.2)
  children = subprocess.run(["pgrep", "-P", str(launcher.pid), "-f", "process_id=1"],
                            capture_output=True, text=True).stdout.split()
  assert len(children) == 1
  # Process 1 only. SIGINT takes the longer way: our handler passes it on as a SIGTERM to
  # JAX's preemption notifier, which then reaches every process as a SIGTERM would.
  os.kill(int(children[0]), signal.SIGINT)
  output, _ = launcher.communicate(timeout=300)
  assert launcher.returncode == 0, output[-3000:]
  summary = json.load(open(workdir / "summary.json"))  # Written by process 0.
  assert summary["stopped_by"] == "signal to one of the processes"
  assert 10 <= summary["steps"] < 2000
  assert str(summary["steps"]) in os.listdir(workdir / "checkpoints")


def test_launch_scripts_parse_and_use_our_settings():
  for script in ("local.sh", "slurm.sbatch", "tpu_vm.sh"):
    subprocess.run(["bash", "-n", str(REPO / "launch" / script)], check=True)
  job = list(yaml.safe_load_all(open(REPO / "launch/gke_indexed_job.yaml")))
  env = {e["name"] for e in job[1]["spec"]["template"]["spec"]["containers"][0]["env"]}
  assert env == {"SLW_COORDINATOR_ADDRESS", "SLW_NUM_PROCESSES"}  # + JOB_COMPLETION_INDEX.
  result = subprocess.run(["launch/local.sh", "zero"], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 2 and result.stderr.startswith("error: usage: launch/local.sh N")


def test_local_launch_stops_everything_when_one_process_fails(tmp_path):
  # Process 1 fails at once; process 0 would wait for it in jax.distributed forever.
  python = tmp_path / "python"
  python.write_text(f"""#!/bin/bash
if [[ " $* " == *" --process_id=1 "* ]]; then exit 3; fi
exec {sys.executable} "$@"
""")
  python.chmod(0o755)
  start = time.time()
  result = subprocess.run(
      ["launch/local.sh", "2", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env={**_env(8), "PYTHON": str(python)}, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 3
  assert "exited with status 3; killing the others" in result.stderr
  assert time.time() - start < 60
