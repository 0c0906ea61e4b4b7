"""Pipeline bubble and activation memory: measured on real ranks against the theory.

    python tools/bench_pipeline.py [--t-forward-ms 50] [--repeats 2]

For p in {2, 4} stages, m in {4, 8} microbatches and v in {1, 2} chunks per rank (1F1B for
v = 1, interleaved for v = 2), spawns p gloo ranks that run Loom's pipeline executor on its
schedule tables, with real p2p of activations and gradients between the ranks. A stage's
compute is a sleep (forward t_f / v, backward 2 t_f / v per chunk), so the bubble is not
distorted by p processes competing for a few CPU cores. Each rank's idle fraction comes from
the executor's time stamps of its compute; the pipeline's span runs from the first compute on
any rank to the last. The theory is (p-1)/(m+p-1) for 1F1B and (p-1)/(v m+p-1) interleaved.
Peak activations: the most microbatch-chunks whose activations a rank held at once (rank 0,
which holds the most), with the schedule's bound.

The measured idle exceeds the theory by the p2p latency on the pipeline's critical path (a few
ms per transfer with p processes on 2 cores). Interleaving has more transfers on that path, so
its gap is larger and shrinks as compute grows (try --t-forward-ms 100).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta


SHAPE = (16, 8)  # activations crossing stages: small, so p2p costs little next to the sleeps


def _sleep_stage(t_forward: float, vpp: int):
    """forward_fn for the executor: sleeps, and its autograd backward sleeps twice as long."""
    import torch

    from engine.parallel.pipeline import StageOutput

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return x * w

        @staticmethod
        def backward(ctx, g):
            time.sleep(2 * t_forward / vpp)
            return g, g.sum()

    weight = torch.ones((), requires_grad=True)

    def forward(chunk, x, mb):
        time.sleep(t_forward / vpp)
        x = torch.zeros(SHAPE) if x is None else x
        out = Sleep.apply(x, weight)
        if mb["last"] and chunk == vpp - 1:
            return StageOutput(None, out.sum(), {"loss_sum": out.detach().sum()})
        return StageOutput(out, None, {})

    return forward


def _run_config(executor, schedule: str, p: int, v: int, m: int, t_forward: float, repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from engine.parallel.pipeline_schedule import build_table

    rank = dist.get_rank()
    table = build_table(schedule, p, v, m, rank)
    forward = _sleep_stage(t_forward, v)
    microbatches = [{"last": rank == p - 1}] * m
    best = None
    for _ in range(repeats + 1):  # the first run warms up
        executor.trace = []
        dist.barrier()
        executor.run(table, microbatches, forward, lambda mb: (SHAPE, torch.float32))
        spans = [None] * p
        dist.all_gather_object(spans, (executor.trace, executor.peak_in_flight))
        idle = _idle(spans)
        if best is None or max(idle) < max(best[0]):
            best = (idle, [peak for _, peak in spans])
    return {"idle": best[0], "peaks": best[1]}


def _idle(spans) -> list[float]:
    start = min(trace[0][1] for trace, _ in spans)
    end = max(trace[-1][2] for trace, _ in spans)
    return [1.0 - sum(t1 - t0 for _, t0, t1 in trace) / (end - start) for trace, _ in spans]


def _worker(rank: int, p: int, store_path: str, configs, t_forward: float, repeats: int, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from engine.parallel.pipeline import PipelineExecutor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, p), rank=rank, world_size=p,
                            timeout=timedelta(seconds=120))
    try:
        executor = PipelineExecutor(dist.group.WORLD, torch.device("cpu"))
        for schedule, v, m in configs:
            out = _run_config(executor, schedule, p, v, m, t_forward, repeats)
            if rank == 0:
                results.put(((p, m, v), out))
    finally:
        dist.destroy_process_group()


def measure(t_forward: float, repeats: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    out = {}
    for p in (2, 4):
        configs = [("1f1b" if v == 1 else "interleaved", v, m) for m in (4, 8) for v in (1, 2)]
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(p, os.path.join(tmp, "store"), configs, t_forward, repeats, results),
                               nprocs=p, join=True, start_method="spawn")
        while not results.empty():
            key, value = results.get()
            out[key] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t-forward-ms", type=float, default=50.0, help="forward time of one full stage")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per config (the best is kept)")
    args = parser.parse_args(argv)

    from engine.parallel.pipeline_schedule import in_flight_bound, theoretical_bubble

    results = measure(args.t_forward_ms / 1000, args.repeats)
    print(f"sleep-based stages: forward {args.t_forward_ms:.0f} ms, backward {2 * args.t_forward_ms:.0f} ms per "
          f"stage (split over v chunks); idle = 1 - busy / pipeline span, per rank")
    header = (f"{'p':>2} {'m':>2} {'v':>2} {'schedule':<12} {'theory':>7} {'idle mean':>9} {'idle max':>8} "
              f"{'peak act (rank 0)':>17} {'bound':>5}")
    print(header)
    print("-" * len(header))
    for (p, m, v), r in sorted(results.items()):
        schedule = "1f1b" if v == 1 else "interleaved"
        theory = theoretical_bubble(schedule, p, v, m)
        idle = r["idle"]
        print(f"{p:>2} {m:>2} {v:>2} {schedule:<12} {theory:>7.3f} {sum(idle) / len(idle):>9.3f} {max(idle):>8.3f} "
              f"{r['peaks'][0]:>17} {in_flight_bound(schedule, p, v, m, 0):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
