#!/usr/bin/env bash
# Multi-node training with the deepspeed launcher over pdsh (passwordless ssh between nodes).
# Run it on the first node of the hostfile, from anywhere:
#
#   launch/multinode.sh launch/hostfile.example --config configs/scale/t5_v1_1_xl.yaml
#
# Everything after the hostfile goes to launch/train.py. The project directory and the Python
# environment must be at the same path on every node (a shared filesystem).
#
# Environment for every rank: the launcher forwards NCCL_*, PYTHON* (and UCX_*, MV2_*) by
# itself; everything else must be listed in a .deepspeed_env file (KEY=VALUE lines, read from
# $HOME and the current directory, or only the file DS_ENV_FILE names). This script writes one
# for the job (your own ~/.deepspeed_env and ./.deepspeed_env lines, then the variables below)
# and points DS_ENV_FILE at it.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1" ]]; then
    echo "usage: $0 HOSTFILE [--config X.yaml] [key=value ...]   (HOSTFILE: see launch/hostfile.example)" >&2
    exit 2
fi
HOSTFILE="$(realpath "$1")"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Node 0 of the hostfile is the rendezvous point; override MASTER_ADDR with its
# high-speed-network address if `hostname -I` of that node would give the wrong one.
FIRST_NODE="$(awk '!/^[[:space:]]*#/ && NF {print $1; exit}' "$HOSTFILE")"
MASTER_ADDR="${MASTER_ADDR:-$FIRST_NODE}"
MASTER_PORT="${MASTER_PORT:-29500}"

ENV_FILE="$(mktemp "${TMPDIR:-/tmp}/bpt_ds_env.XXXXXX")"
trap 'rm -f "$ENV_FILE"' EXIT
{
    # With DS_ENV_FILE set the launcher reads only that file: keep the user's own first.
    for own in "$HOME/.deepspeed_env" "$ROOT/.deepspeed_env"; do
        if [[ -f "$own" ]]; then
            grep -v '^[[:space:]]*\(#\|$\)' "$own" || true
        fi
    done
    # Shared caches: the tiny backbone, datasets and hub files are built or fetched once.
    echo "BPT_DS_CACHE=${BPT_DS_CACHE:-$HOME/.cache/bpt_ds}"
    echo "HF_HOME=${HF_HOME:-$HOME/.cache/huggingface}"
    echo "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}"
    # NCCL's watchdog tears down a rank whose collective outlives deepspeed.timeout_minutes
    # (torch's default, made explicit) instead of blocking the job forever.
    echo "TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}"
    echo "PYTHONPATH=${ROOT}${PYTHONPATH:+:$PYTHONPATH}"
} > "$ENV_FILE"
export DS_ENV_FILE="$ENV_FILE"

deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/train.py "$@"
