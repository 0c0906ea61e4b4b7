"""The video task learns: demo_video (a tiny Qwen2.5-VL-architecture VLM) at world size 1 tells which way a
shape moves on held-out clips, and the same model given each clip's first frame repeated cannot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loom.tools import eval_vqa
from loom.tools.make_synthetic_vqa import make_synthetic_video_vqa
from loom.tools.train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_video_learns_the_direction_of_motion(tmp_path):
    paths = make_synthetic_video_vqa(tmp_path / "video", n_train=3000, n_eval=200)
    tok = train_tokenizer([str(paths["train"])], str(tmp_path / "video" / "tok"), vocab_size=256)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "launch/train.py", "--config", "launch/configs/demo_video.yaml",
                    f"train.run_dir={run}", f"data.train_jsonl={paths['train']}", f"data.eval_jsonl={paths['eval']}",
                    f"data.tokenizer={tok}"], cwd=ROOT, env=env, check=True, timeout=1200, capture_output=True)
    assert eval_vqa.main([str(run)]) == 0
    record = json.loads((run / "eval.json").read_text())
    acc, single = record["accuracy"], record["single_frame_accuracy"]
    assert acc["direction"] >= 0.9, acc  # chance is 0.25
    assert single["direction"] <= 0.4, single
