"""The torchrun entry point end to end: a short TP2 run writes its config and metrics, and learns."""
import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"step", "loss", "grad_norm", "lr", "tokens", "step_time_s", "tokens_per_s"}


@pytest.mark.slow
def test_torchrun_tiny_dense_learns(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "launch/train.py", "--config", "launch/configs/tiny_dense.yaml",
           "parallel.tp=2", "parallel.sp=true", "train.steps=40", "optim.lr=1e-2", f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_PG_TIMEOUT_S": "120"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 40/40 | loss" in proc.stdout and "ETA" in proc.stdout and "\r" not in proc.stdout

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["parallel"]["tp"] == 2 and resolved["train"]["steps"] == 40

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert FIELDS <= set(records[0]), FIELDS - set(records[0])
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, f"loss did not fall: first-5 mean {first:.3f}, last-5 mean {last:.3f}"
