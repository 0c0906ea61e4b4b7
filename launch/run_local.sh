#!/usr/bin/env bash
# Single-node launch over torchrun --standalone:
#
#   bash launch/run_local.sh [NPROC] --config CONFIG [a.b=value ...]
#   bash launch/run_local.sh [NPROC] [torchrun options ...] -- --config CONFIG [a.b=value ...]
#
# Without a `--`, every argument goes to launch/train.py. With one, the arguments before it go to
# torchrun verbatim (after those in $TORCHRUN_ARGS, word-split) and the ones after it to train.py.
#
# NPROC         processes (default 2; the first argument, when it is a number, wins).
# MAX_RESTARTS  torchrun --max-restarts (default 0). Every restart starts all workers again, and
#               train.resume=auto picks up the newest checkpoint, so restarts only pay off with
#               train.save_interval > 0 and a failure that is not deterministic (a config or data
#               error would fail the same way each time). An explicit --max-restarts option wins.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi

torchrun_opts=()
read -r -a torchrun_opts <<< "${TORCHRUN_ARGS:-}"
for arg in "$@"; do
  if [[ "$arg" == "--" ]]; then
    while [[ "$1" != "--" ]]; do torchrun_opts+=("$1"); shift; done
    shift
    break
  fi
done

restarts=(--max-restarts "${MAX_RESTARTS:-0}")
for opt in ${torchrun_opts[@]+"${torchrun_opts[@]}"}; do
  if [[ "$opt" == --max[-_]restarts || "$opt" == --max[-_]restarts=* ]]; then restarts=(); fi
done

exec torchrun --standalone --nproc-per-node "$NPROC" ${restarts[@]+"${restarts[@]}"} \
  ${torchrun_opts[@]+"${torchrun_opts[@]}"} launch/train.py "$@"
