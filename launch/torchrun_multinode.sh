#!/usr/bin/env bash
# Multi-node training: run this same command on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 \
#     launch/torchrun_multinode.sh experiment=tiny parallel=fssdp
# Everything after the script name is passed to `python -m train` (Hydra overrides);
# PYTHON picks the interpreter (default: python3 on PATH, e.g. an activated .venv).
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
: "${PYTHON:=python3}"
: "${NPROC_PER_NODE:=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
cd "$(dirname "$0")/.."
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-moe}" \
  -m train "$@"
