"""Pipeline bubble with real Loom stages, measured under torchrun, against the schedules' theory.

    python -m loom.tools.bench_pipeline [--repeats 6] [--hidden 256] [--tokens 512] [--layers-per-rank 2]

For each pipeline size p, launches ``torchrun --nproc-per-node p`` (gloo, one thread per rank).
Every rank builds its chunks of a dense Loom decoder (``split_stages``: ``layers-per-rank``
blocks per rank, the embedding on the first stage, the fused LM head loss on the last) and runs
Loom's PipelineExecutor on the schedule's tables: 1F1B, interleaved (v = 2) and zb1 (ZB-H1,
backward split into B and W), m microbatches of ``tokens`` tokens each. A timed run is the
best of ``repeats`` after one warm-up.

What each figure means:
- theory: the schedule's idle share with equal stages and free p2p, (p-1)/(m+p-1) for 1F1B,
  (p-1)/(v m+p-1) interleaved, (p-1)/(3m+p-1) zb1 (F = B = W: a third of 1F1B's idle time).
- wall idle: 1 - busy / span per rank, averaged over ranks (the pipeline's bubble fraction);
  busy is the wall time of the rank's computes, span runs from the first compute on any rank to
  the last. It includes everything real: p2p latency, uneven stages (embedding, LM head), the
  executor. Only meaningful when every rank has a core of its own.
- cpu replay: each compute's thread CPU time, measured in the same run, replayed through the
  schedule simulator (engine/parallel/pipeline_simulate.py) with free p2p. It keeps the real
  costs (uneven stages, B and W of unequal cost) but none of the waiting, so it is what the
  schedule yields on this model when p ranks run on p cores, whatever the machine has.
- steady replay: the same replay with each compute's least CPU time over the timed runs. Noise on
  a shared machine (a neighbour on the host, a burst of page faults) only ever lengthens a
  compute, by a different amount in each run; the least time keeps the costs the model really
  has (uneven stages, B and W of unequal cost) and drops the noise, so this is the schedule's own
  bubble on this model. The cpu replay and the wall idle keep the noise: they are the measured
  figures.
- ratio: idle / theory.

With more ranks than cores (p = 4 on a 2-core machine) the wall figures are not a pipeline
measurement: two ranks share each core, so a rank's compute stretches whenever another rank on
its core computes too, and waiting on a peer costs nothing in throughput. The wall idle then
mostly measures the scheduler; read the cpu replay (and the busy CPU per compute) instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loom import cli

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {2: [("1f1b", 1, 8), ("zb1", 1, 8)],
           4: [("1f1b", 1, 8), ("interleaved", 2, 8), ("zb1", 1, 8)]}


# ----------------------------------------------------------------------------- one rank (under torchrun)


def _stage_forward(chunks, vpp):
    from loom.parallel.pipeline import StageOutput
    from loom.train.loss import lm_head_loss

    def forward(chunk, hidden, mb):
        batch, labels = mb
        stage = chunks[chunk]
        if hidden is not None:
            batch = batch.with_hidden(hidden)
        out = stage.hidden_states(batch)
        if stage.lm_head is None:
            return StageOutput(out, None, {})
        loss = lm_head_loss(stage.lm_head, out, labels)
        return StageOutput(None, loss / labels.numel(), {"loss_sum": loss.detach()})

    return forward


def _run_config(args, executor, schedule: str, v: int, m: int) -> dict | None:
    import torch
    import torch.distributed as dist

    from loom.config import ModelConfig
    from loom.model.batch import PackedBatch
    from loom.model.decoder import build_model
    from loom.parallel.pipeline import split_stages
    from loom.parallel.pipeline_schedule import build_table

    rank, p = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_layers=args.layers_per_rank * p, num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64,
                      attn_backend="torch")
    chunks = split_stages(build_model(cfg), rank, p, v)
    ids = torch.randint(0, args.vocab, (args.tokens,))
    microbatches = [(PackedBatch(input_ids=ids), torch.randint(0, args.vocab, (args.tokens,))) for _ in range(m)]
    table = build_table(schedule, p, v, m, rank)
    forward = _stage_forward(chunks, v)
    boundary = lambda mb: ((args.tokens, args.hidden), torch.float32)  # noqa: E731
    runs = []
    for _ in range(args.repeats + 1):  # the first run warms up
        for c in chunks:
            for param in c.parameters():
                param.grad = None
        executor.trace = []
        dist.barrier()
        executor.run(table, microbatches, forward, boundary)
        traces = [None] * p
        dist.all_gather_object(traces, ([(repr(a), t0, t1, cpu) for a, t0, t1, cpu in executor.trace],
                                        executor.peak_in_flight))
        runs.append(traces)
    if rank != 0:
        return None
    return {"schedule": schedule, "p": p, "v": v, "m": m, "runs": runs[1:]}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from loom.parallel.pipeline import PipelineExecutor

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        executor = PipelineExecutor(dist.group.WORLD, torch.device("cpu"))
        results = [_run_config(args, executor, *c) for c in CONFIGS[dist.get_world_size()]]
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the driver


def measure(args, p: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={p}",
                   "-m", "loom.tools.bench_pipeline", "--worker", "--out", out, *_model_args(args)]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return json.loads(Path(out).read_text())


def _model_args(args) -> list[str]:
    return [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("repeats", "hidden", "tokens", "layers_per_rank",
                                                                    "vocab")]


def analyse(result: dict) -> dict:
    """The best run (lowest wall idle) of a config: wall idle and the cpu replay per rank."""
    from loom.parallel.pipeline_schedule import build_tables
    from loom.parallel.pipeline_simulate import bubble_fraction, simulate

    p, v, m, schedule = result["p"], result["v"], result["m"], result["schedule"]
    best = None
    tables = build_tables(schedule, p, v, m)
    for traces in result["runs"]:
        start = min(trace[0][1] for trace, _ in traces)
        end = max(trace[-1][2] for trace, _ in traces)
        wall = [1.0 - sum(t1 - t0 for _, t0, t1, _ in trace) / (end - start) for trace, _ in traces]
        cpu = [{a: c for a, _, _, c in trace} for trace, _ in traces]
        replay = bubble_fraction(simulate(tables, cost=lambda r, a: cpu[r][repr(a)]))
        busy_cpu = [sum(c.values()) for c in cpu]
        busy_wall = [sum(t1 - t0 for _, t0, t1, _ in trace) for trace, _ in traces]
        row = {"wall": wall, "replay": replay, "span": end - start, "peak": [peak for _, peak in traces],
               "cpu_per_wall": sum(busy_cpu) / sum(busy_wall), "costs": [_mean_costs(c) for c in cpu]}
        if best is None or sum(wall) < sum(best["wall"]):
            best = row
    least = [{} for _ in range(p)]  # each compute's least CPU time over the runs
    for traces in result["runs"]:
        for r, (trace, _) in enumerate(traces):
            for a, _, _, c in trace:
                least[r][a] = min(c, least[r].get(a, c))
    best["steady"] = bubble_fraction(simulate(tables, cost=lambda r, a: least[r][repr(a)]))
    return best


def _mean_costs(cpu: dict) -> dict:
    """One rank's mean CPU seconds of F, B and W per chunk."""
    out = {}
    for kind in "FBW":
        values = [c for a, c in cpu.items() if a.startswith(kind)]
        if values:
            out[kind] = sum(values) / len(values)
    return out


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="timed runs per config (the best is kept)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per microbatch")
    parser.add_argument("--layers-per-rank", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128, help="small: the LM head barely unbalances the stages")
    parser.add_argument("--sizes", default="2,4", help="pipeline sizes p to run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from loom.parallel.pipeline_schedule import in_flight_bound, theoretical_bubble

    started, load = time.time(), os.getloadavg()[0]
    rows = [(result, analyse(result)) for p in map(int, args.sizes.split(",")) for result in measure(args, p)]
    print(f"\nreal Loom stages: hidden {args.hidden}, {args.layers_per_rank} layers per rank, {args.tokens} tokens "
          f"per microbatch, fp32, gloo, 1 thread per rank, {os.cpu_count()} cores (load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after); best of {args.repeats} runs ({time.time() - started:.0f} s)")
    header = (f"{'p':>2} {'m':>2} {'v':>2} {'schedule':<12} {'theory':>6} | {'wall idle':>9} {'ratio':>5} | "
              f"{'cpu replay':>10} {'ratio':>5} | {'steady':>6} {'ratio':>5} | {'cpu/wall':>8} | "
              f"{'peak act':>8} {'bound':>5} | "
              "F / B / W ms per rank")
    print(header)
    print("-" * len(header))
    for result, r in rows:
        p, v, m, schedule = result["p"], result["v"], result["m"], result["schedule"]
        theory = theoretical_bubble(schedule, p, v, m)
        wall, replay, steady = sum(r["wall"]) / p, sum(r["replay"]) / p, sum(r["steady"]) / p
        costs = "  ".join("/".join(f"{1000 * c[k]:.0f}" if k in c else "-" for k in "FBW") for c in r["costs"])
        print(f"{p:>2} {m:>2} {v:>2} {schedule:<12} {theory:>6.3f} | {wall:>9.3f} {wall / theory:>5.2f} | "
              f"{replay:>10.3f} {replay / theory:>5.2f} | {steady:>6.3f} {steady / theory:>5.2f} | "
              f"{r['cpu_per_wall']:>8.2f} | "
              f"{r['peak'][0]:>8} {in_flight_bound(schedule, p, v, m, 0):>5} | {costs}")
    print("\nidle: mean over ranks of 1 - busy / span; ratio: idle / theory. cpu/wall: CPU seconds per wall second "
          "of compute (1.00: a core of its own; ~0.5: two ranks per core, the wall figures then measure the OS "
          "scheduler, not the pipeline). peak act: microbatch-chunks rank 0 held at once (to B; zb1: to W). "
          "F / B / W ms: mean CPU time of one chunk's compute on each rank (zb1: B input gradients, W weights, "
          "the first stage's B empty and its W the whole backward; otherwise B is the whole backward).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
