#!/usr/bin/env bash
# The torchrun form, for clusters where torchrun is the norm. Run the same command on every
# node (NODE_RANK 0 .. NNODES-1); node 0's address is the rendezvous point.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=gpu-node-01 launch/torchrun.sh --config configs/scale/t5_v1_1_xl.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=gpu-node-01 launch/torchrun.sh --config configs/scale/t5_v1_1_xl.yaml
#
# Arguments go to launch/train.py (it reads RANK/LOCAL_RANK/WORLD_SIZE from torchrun).
# torchrun passes this shell's environment to its ranks: export what they need here.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}"
if [[ "$GPUS_PER_NODE" -lt 1 ]]; then
    GPUS_PER_NODE=1  # no GPU: one CPU rank
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

export BPT_DS_CACHE="${BPT_DS_CACHE:-$HOME/.cache/bpt_ds}"
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py "$@"
