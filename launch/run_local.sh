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
#               checkpoint.resume=auto picks up the newest checkpoint, so restarts only pay off with
#               checkpoint.save_interval > 0 and a failure that is not deterministic (a config or data
#               error would fail the same way each time). An explicit --max-restarts option wins.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi

# shellcheck source=launch/torchrun_args.sh
source launch/torchrun_args.sh
split_torchrun_args "$@"
exec torchrun --standalone --nproc-per-node "$NPROC" "${torchrun_opts[@]}" \
  launch/train.py ${train_args[@]+"${train_args[@]}"}
