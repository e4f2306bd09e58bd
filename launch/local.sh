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

declare -A process_of=()  # pid -> process id, for the processes not reaped yet.
# Only live ones: a reaped pid may already belong to an unrelated process.
trap 'kill -TERM "${!process_of[@]}" 2>/dev/null || true' INT TERM  # Each finishes its step.
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m slw_jax.main "$@" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="$num_processes" --process_id="$i" &
  process_of[$!]=$i
done

# Wait for all; on the first failure, kill the rest at once (without it they cannot finish a
# step, they would only wait for it) and exit with that failure's status.
status=0
while ((${#process_of[@]} > 0)); do
  finished="" rc=0
  # Only the processes not reaped yet: given a reaped one, `wait` prints bash's own "no such
  # job", which would bury the failed process's error line.
  wait -n -p finished "${!process_of[@]}" || rc=$?
  # A trapped signal interrupted `wait`, which then leaves `finished` unset (not empty).
  if [[ -z "${finished:-}" ]]; then continue; fi
  id=${process_of[$finished]}
  unset "process_of[$finished]"
  if [[ $rc -ne 0 ]]; then
    status=$rc
    kill -KILL "${!process_of[@]}" 2>/dev/null || true
    # Reaped quietly: bash would report each as "Killed", after the failure's error line.
    for pid in "${!process_of[@]}"; do wait "$pid" 2>/dev/null || true; done
    # Last: nothing is left to write after it.
    echo "launch/local.sh: process $id (pid $finished) exited with status $rc; killing the" \
      "others (its error is above)" >&2
    break
  fi
done
exit "$status"
