#!/usr/bin/env bash
# slw_jax on a Cloud TPU VM slice: the same command on every worker, one process each.
#
# Usage: launch/tpu_vm.sh TPU_NAME ZONE --config=configs/gpt2_117m.py --workdir=/mnt/runs/117m \
#          --config.data.source='files:/mnt/owt/*.jsonl' --config.data.vocab=gpt2:/mnt/gpt2/ \
#          [--config.a.b=v ...]   (the paper configs have no default corpus: docs/data.md)
# Each worker needs this repository at $REPO_DIR (default ~/slw_jax) with
#   .venv/bin/pip install -r requirements-train.txt "jax[tpu]==0.10.2"
# and --workdir / data.dir on storage every worker shares (e.g. a Filestore mount).
# SLW_DISTRIBUTED=auto lets JAX read the slice's topology and coordinator itself.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "error: usage: launch/tpu_vm.sh TPU_NAME ZONE --config=... --workdir=... [...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo_dir=${REPO_DIR:-'~/slw_jax'}
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command \
  "cd $repo_dir && SLW_DISTRIBUTED=auto .venv/bin/python -m slw_jax.main $args"
