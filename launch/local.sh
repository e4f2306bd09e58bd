#!/usr/bin/env bash
# N processes of slw_jax.main on this machine (CPU backend), coordinator on 127.0.0.1: a
# multi-host run without a cluster (how the tests check multi-process training).
#
# Usage: launch/local.sh N --config=configs/tiny.py --workdir=runs/local [--config.a.b=v ...]
# Environment: DEVICES_PER_PROCESS (1) simulated CPU devices per process; PORT (a free one) of
# the coordinator; PYTHON (.venv/bin/python). SIGINT/SIGTERM are passed on to every process
# (each finishes its step, they save together and exit 0). Exits with the first failure's status.
# Needs bash >= 5.1 (wait -n -p).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: usage: launch/local.sh N --config=... --workdir=... (N: processes, >= 1; got '${1:-}')" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-.venv/bin/python}
devices=${DEVICES_PER_PROCESS:-1}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# Our device count replaces any the caller set; other XLA flags are kept.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g') --xla_force_host_platform_device_count=${devices}"

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM  # Each finishes its step and saves.
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m slw_jax.main "$@" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="$num_processes" --process_id="$i" &
  pids+=($!)
done

# Wait for all; on the first failure, kill the rest at once (without it they cannot finish a
# step, they would only wait for it) and exit with that failure's status.
status=0
for ((left = num_processes; left > 0; )); do
  finished="" rc=0
  wait -n -p finished "${pids[@]}" || rc=$?
  if [[ -z "$finished" ]]; then continue; fi  # A trapped signal interrupted `wait`.
  left=$((left - 1))
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    echo "launch/local.sh: process $finished exited with status $rc; killing the others" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
