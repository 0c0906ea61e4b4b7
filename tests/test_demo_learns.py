"""The quick-start recipe learns: demo_vlm_moe at world size 1 answers held-out questions.

The quick-start job itself runs the same config on 4 ranks (TP2+SP x EP2); the parity tests
(tests/test_vlm_parallel.py) tie those layouts to world size 1, so this run stands for it at a
fraction of the cost. Both question types must beat 80%, and the same model given blank images
must not: the answers come from the image.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loom.tools import eval_vqa
from loom.tools.make_synthetic_vqa import make_synthetic_vqa
from loom.tools.train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_vlm_moe_learns_the_task(tmp_path):
    paths = make_synthetic_vqa(tmp_path / "vqa", n_train=6000, n_eval=200, image_size=32)
    tok = train_tokenizer([str(paths["train"])], str(tmp_path / "vqa" / "tok"), vocab_size=256)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "launch/train.py", "--config", "launch/configs/demo_vlm_moe.yaml",
                    "parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "train.micro_batch_size=32",
                    "train.steps=700", "checkpoint.save_interval=700", f"train.run_dir={run}",
                    f"data.train_jsonl={paths['train']}", f"data.eval_jsonl={paths['eval']}", f"data.tokenizer={tok}"],
                   cwd=ROOT, env=env, check=True, timeout=900, capture_output=True)
    assert eval_vqa.main([str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())
    acc, blank = record["accuracy"], record["blank_image_accuracy"]
    assert acc["colour"] > 0.8 and acc["shape"] > 0.8 and acc["overall"] >= 0.9, acc
    assert blank["overall"] < 0.5, blank
