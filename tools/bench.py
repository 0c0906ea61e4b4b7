"""``loom-bench NAME [ARGS ...]``: one entry point for the benchmarks under tools/.

    loom-bench step        Loom's train step against HF's at world size 1 (tools/bench_step.py)
    loom-bench moe         a MoE model's training steps under torchrun: time, TFLOP/s, MFU, bytes, expert
                           load, real against balanced routing (tools/bench_moe.py)
    loom-bench grouped-gemm  routed experts: grouped GEMM against a loop (tools/bench_grouped_gemm.py)
    loom-bench attention   Triton / flash-attn / torch attention backends (tools/bench_attention.py)
    loom-bench cp          context-parallel load balance and bytes sent (tools/bench_context_parallel.py)
    loom-bench pipeline    pipeline schedules' bubbles with real stages under torchrun (tools/bench_pipeline.py)
    loom-bench memory      each rank's memory against its share as the layout grows (tools/bench_memory.py)
    loom-bench data        multimodal loading: the step loader per worker count, and a demo step with real
                           loading against prepared batches (tools/bench_data.py)

``loom-bench NAME --help`` shows that benchmark's options.
"""
from __future__ import annotations

import importlib
import sys

from loom import cli

BENCHES = {"step": "bench_step", "moe": "bench_moe", "grouped-gemm": "bench_grouped_gemm",
           "attention": "bench_attention", "cp": "bench_context_parallel", "pipeline": "bench_pipeline",
           "memory": "bench_memory", "data": "bench_data"}


@cli.entry
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHES:
        print(__doc__, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"loom.tools.{BENCHES[argv[0]]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
