"""Memory against the layout: does each rank hold only its share of a model that grows?

    loom-bench memory [--world 8] [--layouts tp8,tp4pp2,dp8] [--hidden 1024 --layers 8 ...]

Trains a Llama-shaped dense model (about 160M parameters by default) for 2 fp32 steps at world size
1 and under each layout, one gloo rank per process, and reports for the most loaded rank

    footprint = peak resident memory - the rank's fixed overhead

The fixed overhead is the process's resident memory after torch, the process group and one warm-up
step of a tiny model with the same layout have run (libraries paged in, communicators built); the
peak is the kernel's high-water mark of resident memory (reset with /proc/self/clear_refs) over
set-up and the two steps. It counts everything the rank really held: weights, gradients, optimizer
state, activations, communication buffers, allocator slack.

A rank's ideal share of the world-size-1 footprint F1 is what model parallelism and the distributed
optimizer should leave it:

    ideal = m * F1 - m * O1 * (1 - 1/d)

m is the rank's fraction of the parameters (TP and PP: the largest pipeline stage's, over TP), O1
the Adam moments at world size 1 (8 bytes per fp32 parameter) and d the distributed optimizer's
data-parallel size (1 without it). So TP8 should hold F1/8, TP4 x PP2 a quarter of its stage's part,
and DP8, which keeps whole weights, gradients and per-microbatch activations, all of F1 but 7/8 of
the moments. The table shows footprint / ideal for the most loaded rank: 1.0 is perfect. Sequences
are short so the state dominates, as it does for the large models this is about. Runs on CPU, a few
minutes on 2 cores.

Every rank runs glibc's malloc with a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=1MiB``): by
default the threshold grows with the largest block freed, after which freed gradients and
activations of up to 32 MiB stay resident in the heap, tens of MiB per process that no tensor
holds (measured: TP4 ranks 372-395 MiB against 356-358 MiB with the fixed threshold, for 308 MiB of
state). World size 1 runs under the same setting. CUDA's caching allocator has no such effect.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from datetime import timedelta

from loom import cli

CONFIG = str(Path(__file__).resolve().parents[1] / "launch/configs/tiny_dense.yaml")
_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
# TP with SP, as Megatron runs it: without SP the norms' and block inputs' activations stay whole on every TP rank.
LAYOUTS = {"tp8": ["parallel.tp=8", "parallel.sp=true"],
           "tp4pp2": ["parallel.tp=4", "parallel.sp=true", "parallel.pp=2"],
           "dp8": [], "tp4": ["parallel.tp=4", "parallel.sp=true"],
           "tp2pp2": ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"], "dp4": []}


def model_overrides(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                    seq_len: int = 32) -> list[str]:
    return [f"model.hidden_size={hidden}", f"model.num_layers={layers}", f"model.num_heads={heads}",
            f"model.num_kv_heads={kv_heads}", f"model.intermediate_size={intermediate}", f"model.vocab_size={vocab}",
            "model.attn_backend=torch", "train.dtype=fp32", f"data.seq_len={seq_len}", "data.num_tokens=8192",
            "train.global_batch_size=8", "train.micro_batch_size=1", "train.steps=2", "checkpoint.save_interval=0",
            "checkpoint.resume=none", "train.log_interval=1000", "optim.warmup_steps=1"]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release() -> None:
    """Drop what the warm-up freed, so it is not reused by (and hidden from) the measured run."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the overhead then includes the allocator's cache
        pass
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current resident size
        f.write("5")


def _train(overrides: list[str], run_dir: str):
    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(CONFIG, [*overrides, f"train.run_dir={run_dir}"])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    trainer.fit()
    return trainer, groups


def rank_footprint(model: list[str], layout: list[str], run_dir: str) -> dict:
    """On every rank of the current world: train ``model`` under ``layout`` and measure this rank."""
    import torch.distributed as dist

    tiny = model_overrides(128, 2, 16, 8, 256, 512)  # the same code paths, a negligible size
    trainer, groups = _train([*tiny, *layout], run_dir)
    groups.destroy()
    del trainer, groups
    _release()
    baseline = _status("VmRSS")
    trainer, groups = _train([*model, *layout], run_dir)
    peak = _status("VmHWM")
    out = {"rank": dist.get_rank(), "footprint": peak - baseline, "baseline": baseline,
           "params": sum(p.numel() for p in trainer.params), "dp": groups.dims.dp * groups.dims.cp,
           "distributed": trainer.grads.distributed, "state_bytes": _state_bytes(trainer)}
    groups.destroy()
    return out


def _state_bytes(trainer) -> int:
    grads = trainer.grads
    return sum(b.param_data.nbytes + b.grad_data.nbytes for b in grads.buckets) + trainer.optimizer.state_bytes()


def ideal_share(ws1: dict, rank: dict) -> float:
    """``m * F1 - m * O1 * (1 - 1/d)``: see the module docstring."""
    m = rank["params"] / ws1["params"]
    d = rank["dp"] if rank["distributed"] else 1
    moments = 8 * ws1["params"]  # fp32 exp_avg + exp_avg_sq
    return m * ws1["footprint"] - m * moments * (1 - 1 / d)


def summarize(ws1: dict, ranks: list[dict]) -> dict:
    """The most loaded rank's footprint against its ideal share of the world-size-1 footprint."""
    rows = []
    for r in ranks:
        share = ideal_share(ws1, r)
        rows.append({**r, "ideal": share, "ratio": r["footprint"] / share})
    worst = max(rows, key=lambda r: r["ratio"])
    return {"largest_footprint": max(r["footprint"] for r in rows), "worst_rank": worst["rank"],
            "ratio": worst["ratio"], "ideal": worst["ideal"], "ranks": rows}


def _worker(rank, world, store_path, model, layout, run_dir, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    sys.stdout = open(os.devnull, "w")  # the trainers' own reports: the table is the parent's output
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    try:
        results.put(rank_footprint(model, layout, run_dir))
    finally:
        dist.destroy_process_group()


def measure(world: int, model: list[str], layout: list[str]) -> list[dict]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    previous = os.environ.get(_MMAP_THRESHOLD)
    os.environ[_MMAP_THRESHOLD] = str(1 << 20)  # read by each rank's malloc at start-up (module docstring)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = (world, os.path.join(tmp, "store"), model, layout, os.path.join(tmp, "run"), results)
            mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method="spawn")
    finally:
        if previous is None:
            os.environ.pop(_MMAP_THRESHOLD)
        else:
            os.environ[_MMAP_THRESHOLD] = previous
    out = [results.get() for _ in range(world)]
    return sorted(out, key=lambda r: r["rank"])


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layouts", default="tp8,tp4pp2,dp8", help=f"comma-separated, of {sorted(LAYOUTS)}")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.layouts.split(",")) - set(LAYOUTS))
    if unknown:
        raise SystemExit(f"bench_memory: --layouts {','.join(unknown)}: not one of {', '.join(sorted(LAYOUTS))}")
    model = model_overrides(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab)
    ws1 = measure(1, model, [])[0]
    table = {}
    for name in args.layouts.split(","):
        table[name] = summarize(ws1, measure(args.world, model, LAYOUTS[name]))
    if args.json:
        print(json.dumps({"world_size_1": ws1, "layouts": table}, indent=1))
        return 0
    mib = 2.0**20
    print(f"{ws1['params'] / 1e6:.0f}M parameters, fp32, 2 steps; world size 1 footprint {ws1['footprint'] / mib:.0f} "
          f"MiB (its state: {ws1['state_bytes'] / mib:.0f} MiB)")
    print(f"{'layout':<8} {'ranks':>5} {'largest MiB':>11} {'ideal MiB':>9} {'largest/ideal':>13}")
    for name, row in table.items():
        print(f"{name:<8} {args.world:>5} {row['largest_footprint'] / mib:>11.0f} {row['ideal'] / mib:>9.0f} "
              f"{row['ratio']:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
