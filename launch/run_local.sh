#!/usr/bin/env bash
# Single-node launch: bash launch/run_local.sh [NPROC] --config CONFIG [a.b=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
exec torchrun --standalone --nproc-per-node "$NPROC" launch/train.py "$@"
