"""The planner's TFLOP/s per GPU for layouts with published Megatron throughput, against the published figure.

    python -m loom.tools.plan compare-published [--json OUT]

The published runs' exact batches and layouts are not all public; the assumptions are in ``RUNS`` and
printed beside each figure. fp8 runs are modelled with the profile's peak doubled (1979 TFLOP/s, H100's
dense fp8 peak) and the same efficiency: Megatron's fp8 recipes run the linear layers in fp8, so that is
an upper bound of their speed-up. Model FLOPs are Loom's count (engine/train/flops.py: causal attention's
pairs; Megatron's own count differs by the attention square and, for DeepSeek-V3, by MLA, which Loom's
standard attention replaces), so a part of any gap is the FLOP convention, not the time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loom import cli
from loom.tools.plan_costs import HardwareProfile, Layout, estimate

ROOT = Path(__file__).resolve().parents[1]  # the checkout, or the installed loom (its launch/configs)
FP8_TFLOPS = 1979.0
RUNS = [
    {"name": "Mixtral-8x7B", "config": "launch/configs/models/mixtral_8x7b.yaml", "gpus": 64, "published": 468.0,
     "dtype": "bf16", "layout": Layout(tp=1, pp=4, vpp=8, cp=1, ep=8, etp=1, dp=16, recompute="none"),
     "overrides": ["data.seq_len=4096", "train.global_batch_size=256"],
     "assumed": "64 H100, TP1 PP4 VPP8 EP8 DP16 (NeMo's recipe layout), seq 4096, global batch 256, no recompute"},
    {"name": "Qwen3-30B-A3B", "config": "launch/configs/models/qwen3_30b_a3b.yaml", "gpus": 16, "published": 203.0,
     "dtype": "fp8", "layout": Layout(tp=1, pp=1, vpp=1, cp=1, ep=16, etp=1, dp=16, recompute="none"),
     "overrides": ["data.seq_len=4096", "train.global_batch_size=256"],
     "assumed": "16 H100, TP1 PP1 EP16 DP16, seq 4096, global batch 256, no recompute"},
    {"name": "DeepSeek-V3", "config": "launch/configs/models/deepseek_v3.yaml", "gpus": 1024, "published": 338.0,
     "dtype": "fp8", "layout": Layout(tp=2, pp=8, vpp=1, cp=1, ep=64, etp=1, dp=64, recompute="selective"),
     "overrides": ["data.seq_len=4096", "train.global_batch_size=1024", "parallel.pp_layout=[7,8,8,8,8,8,8,6]"],
     "assumed": "1024 H100, TP2 PP8 (7+8x6+6 layers) EP64 etp1 DP64, seq 4096, global batch 1024, "
                "selective recompute"},
]


def evaluate(run: dict, profile: HardwareProfile) -> dict:
    import dataclasses

    from loom.config import load_config
    from loom.tools.plan_costs import layout_config

    lay = run["layout"]
    if run["dtype"] == "fp8":
        profile = dataclasses.replace(profile, gpu_tflops=FP8_TFLOPS)
    cfg = layout_config(load_config(str(ROOT / run["config"]), run["overrides"]), lay)
    cfg.parallel.pp_layout = load_config(str(ROOT / run["config"]), run["overrides"]).parallel.pp_layout
    cfg.validate(run["gpus"])
    est = estimate(cfg, lay, profile)
    tf = est.tflops_per_gpu(run["gpus"])
    return {"name": run["name"], "layout": lay.name, "gpus": run["gpus"], "dtype": run["dtype"],
            "peak_tflops": profile.gpu_tflops, "estimated_tflops": tf, "published_tflops": run["published"],
            "difference": tf / run["published"] - 1, "dominant": est.dominant, "seconds": est.seconds,
            "assumed": run["assumed"]}


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the comparison here")
    args = parser.parse_args(argv)
    rows = [evaluate(run, HardwareProfile()) for run in RUNS]
    print(f"{'model':<15} {'layout':<40} {'peak':>6} {'estimate':>9} {'published':>9} {'diff':>6}  dominant")
    for r in rows:
        print(f"{r['name']:<15} {r['layout']:<40} {r['peak_tflops']:>6.0f} {r['estimated_tflops']:>9.1f} "
              f"{r['published_tflops']:>9.1f} {r['difference']:>+6.0%}  {r['dominant']}")
        print(f"{'':<15} assumed: {r['assumed']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
