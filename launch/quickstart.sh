#!/usr/bin/env bash
# Install Loom, then the default job: make a synthetic VQA set (coloured shapes), train its
# tokenizer, train a tiny ViT + MoE LLM on 4 CPU ranks (TP2 with SP x EP2, DP2), draw the loss
# curve and print held-out accuracy (greedy, exact match) per question type.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e .
NPROC="${NPROC:-4}"
DATA="${DATA:-data/vqa_demo}"
RUN_DIR="${RUN_DIR:-runs/demo_vlm_moe}"
if [ ! -f "$DATA/eval.jsonl" ]; then
  python tools/make_synthetic_vqa.py --out "$DATA" --train "${TRAIN_SAMPLES:-10000}" --eval 400 --image-size 32
fi
if [ ! -f "$DATA/tok.model" ]; then
  python tools/train_tokenizer.py --input "$DATA/train.jsonl" --out "$DATA/tok" --vocab-size 256
fi
rm -rf "$RUN_DIR"
torchrun --standalone --nproc-per-node "$NPROC" launch/train.py --config launch/configs/demo_vlm_moe.yaml \
  data.train_jsonl="$DATA/train.jsonl" data.eval_jsonl="$DATA/eval.jsonl" data.tokenizer="$DATA/tok.model" \
  train.run_dir="$RUN_DIR" "$@"
python tools/plot_metrics.py "$RUN_DIR/metrics.jsonl" --check-falls
python tools/eval_vqa.py "$RUN_DIR" --min-accuracy 0.9  # exits 1 when the model did not learn
echo "quickstart: $(( $(date +%s) - start )) s wall time, set-up included"
