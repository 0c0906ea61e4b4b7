#!/usr/bin/env bash
# Multi-node launch over torchrun's c10d rendezvous. Run the same command on every node:
#
#   bash launch/run_multinode.sh NNODES NODE_RANK MASTER_ADDR [MASTER_PORT] -- --config CONFIG [a.b=value ...]
#
# or set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (and NPROC_PER_NODE, RUN_ID) in the
# environment and pass only the training arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
positional=()
while [[ $# -gt 0 && "$1" != "--" && "$1" != --* ]]; do positional+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
NNODES="${positional[0]:-${NNODES:-}}"
NODE_RANK="${positional[1]:-${NODE_RANK:-}}"
MASTER_ADDR="${positional[2]:-${MASTER_ADDR:-}}"
MASTER_PORT="${positional[3]:-${MASTER_PORT:-29500}}"
for var in NNODES NODE_RANK MASTER_ADDR; do
  if [[ -z "${!var}" ]]; then echo "run_multinode.sh: $var is not set (argument or environment)" >&2; exit 2; fi
done
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then NPROC_PER_NODE=$(nvidia-smi -L | wc -l); else NPROC_PER_NODE=2; fi
fi
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RUN_ID:-loom}" \
  launch/train.py "$@"
