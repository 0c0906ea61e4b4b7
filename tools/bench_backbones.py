"""The quick-start VQA task with each vision tower: held-out accuracy and step time per ``model.vision.arch``.

    python tools/bench_backbones.py [--archs vit,clip,siglip] [--steps 700] [--out runs/bench_backbones] [KEY=VALUE ...]

Each tower trains ``launch/configs/demo_vlm_moe.yaml`` at world size 1 with the slow demo test's
settings (tests/test_demo_learns.py: 6000 training samples, 700 steps of micro batch 32, fp32 on
CPU) and differs from the others by the one key ``model.vision.arch``; everything else, the data and
the seed included, is shared. Extra ``KEY=VALUE`` overrides go to every run. Prints a table of
held-out accuracy (tools/eval_vqa.py: greedy, exact match, per question type), the accuracy with
blank images (which must stay low: the answers come from the image), and the mean and median step
time (steps after the first 10, which warm up; on shared CPUs the median is the steadier figure),
then writes ``results.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loom import cli
from loom.tools import eval_vqa
from loom.tools.make_synthetic_vqa import make_synthetic_vqa
from loom.tools.train_tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent

CONFIG = "launch/configs/demo_vlm_moe.yaml"
WORLD_SIZE_1 = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "train.micro_batch_size=32"]
WARMUP_STEPS = 10


def make_data(out: Path) -> dict[str, str]:
    """The demo test's data set and tokenizer (made once, shared by every tower)."""
    paths = make_synthetic_vqa(out / "vqa", n_train=6000, n_eval=200, image_size=32)
    tok = train_tokenizer([str(paths["train"])], str(out / "vqa" / "tok"), vocab_size=256)
    return {"train": str(paths["train"]), "eval": str(paths["eval"]), "tokenizer": tok}


def train_and_eval(arch: str, data: dict, run: Path, steps: int = 700, extra=(), threads: int = 2) -> dict:
    """Train one tower, evaluate it; returns its accuracies and step times."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "launch/train.py", "--config", CONFIG, *WORLD_SIZE_1, f"model.vision.arch={arch}",
           f"train.steps={steps}", f"checkpoint.save_interval={steps}", f"train.run_dir={run}",
           f"data.train_jsonl={data['train']}", f"data.eval_jsonl={data['eval']}",
           f"data.tokenizer={data['tokenizer']}", *extra]
    shutil.rmtree(run, ignore_errors=True)  # a run directory with a checkpoint would resume
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=1800, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"training with model.vision.arch={arch} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - start
    if eval_vqa.main([str(run)]) != 0:
        raise RuntimeError(f"evaluating {run} failed")
    record = json.loads((run / "eval.json").read_text())
    times = [r["step_time_s"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "step_time_s" in r and r.get("step", 0) > WARMUP_STEPS]
    return {"arch": arch, "accuracy": record["accuracy"], "blank_image_accuracy": record["blank_image_accuracy"],
            "mean_step_s": statistics.fmean(times), "median_step_s": statistics.median(times), "train_wall_s": wall,
            "steps": steps}


def table(results: list[dict]) -> str:
    head = ("arch", "overall", "colour", "shape", "blank", "mean ms", "median ms", "train s")
    lines = [" ".join(f"{h:>9}" for h in head)]
    for r in results:
        a = r["accuracy"]
        row = (a["overall"], a.get("colour", 0), a.get("shape", 0), r["blank_image_accuracy"]["overall"])
        lines.append(f"{r['arch']:>9} " + " ".join(f"{x:9.3f}" for x in row) + " " + " ".join(
            f"{x:9.1f}" for x in (r["mean_step_s"] * 1000, r["median_step_s"] * 1000, r["train_wall_s"])))
    return "\n".join(lines)


def run(archs, out: Path, steps: int = 700, extra=()) -> list[dict]:
    from loom.config import load_config

    def configs(data=()):
        return [load_config(str(ROOT / CONFIG), [*WORLD_SIZE_1, f"model.vision.arch={arch}", *extra, *data])
                for arch in archs]

    configs()  # a bad key or value type fails here, before the data is made
    out = Path(out)
    data = make_data(out)
    for cfg in configs([f"data.train_jsonl={data['train']}", f"data.eval_jsonl={data['eval']}",
                        f"data.tokenizer={data['tokenizer']}"]):
        cfg.validate(1)  # and a bad combination here, against the real files, not in a subprocess
    return [train_and_eval(arch, data, out / f"run_{arch}", steps, extra) for arch in archs]


@cli.entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="vit,clip,siglip", help="comma-separated model.vision.arch values")
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--out", type=Path, default=Path("runs/bench_backbones"))
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides for every run")
    args = p.parse_args(argv)
    results = run(args.archs.split(","), args.out, args.steps, args.overrides)
    print(table(results))
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
