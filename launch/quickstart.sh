#!/usr/bin/env bash
# Install Loom and run the default training job on CPU ranks; it prints the loss falling.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e .
NPROC="${NPROC:-4}"
RUN_DIR="${RUN_DIR:-runs/quickstart}"
rm -rf "$RUN_DIR"
# 4 ranks: tensor parallel 2 (with sequence parallelism) x data parallel 2.
torchrun --standalone --nproc-per-node "$NPROC" launch/train.py \
  --config launch/configs/tiny_dense.yaml parallel.tp=2 parallel.sp=true optim.lr=1e-2 optim.min_lr=1e-3 train.run_dir="$RUN_DIR" "$@"
python tools/plot_metrics.py "$RUN_DIR/metrics.jsonl" --check-falls
