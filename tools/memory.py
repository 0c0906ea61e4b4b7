"""Dry-run one rank of any layout on this machine: its memory, from the real shard shapes.

    python tools/memory.py --config C --world N --rank R [--json] [a.b=v ...]
    python tools/memory.py --config C --world N --most-loaded [--json]

Builds rank R of an N-rank job exactly as training would (the trainer's set-up: meta-device model,
parallelize, gradient buckets, optimizer shards) under torch's fake process group, which gives any
rank of any world size in one process, with collectives that do nothing. Nothing is allocated: the
parameters, gradient buckets and optimizer shards stay on the meta device, and their sizes are what
a real rank would allocate (bucket padding included). Prints the rank's memory report
(engine/train/memory.py): parameters, gradients and optimizer states as held, against Megatron's
formula, and activations by the formula (a dry run runs no forward). Megatron's formula counts the
parameters from the architecture and the layout (engine/train/param_count.py); where the rank holds
other counts the command says so and exits with 1.

``--most-loaded`` dry-runs the first rank of every pipeline stage (the other ranks of a stage hold
the same shapes) and reports the one with the most bytes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from loom import cli


def dry_run(config: str, world: int, rank: int, overrides: list[str]):
    """The MemoryReport of ``rank`` in a ``world``-rank job of ``config``. Initialises (and then
    destroys) the fake process group of this process."""
    import torch
    import torch.distributed as dist

    from loom.compat import fake_process_group_store
    from loom.config import load_config
    from loom.model.lora import quantize_base
    from loom.parallel.mesh import ParallelDims, ParallelGroups
    from loom.train.memory import report_rank
    from loom.train.setup import build_rank

    cfg = load_config(config, overrides)
    cfg.validate(world)
    if not 0 <= rank < world:
        raise SystemExit(f"--rank {rank} is not in [0, {world})")
    dist.init_process_group("fake", store=fake_process_group_store(), rank=rank, world_size=world)
    try:
        p = cfg.parallel
        dims = ParallelDims(tp=p.tp, cp=p.cp, dp=cfg.dp_size(world), pp=p.pp, ep=p.ep, etp=p.resolved_etp)
        groups = ParallelGroups(dims, device=torch.device("cpu"))
        built = build_rank(cfg, groups, None, torch.device("meta"))
        quantize_base(built.model, cfg.finetune.lora)  # QLoRA: the base as the trainer holds it (NF4)
        return report_rank(cfg, groups, built.model, built.optimizer)
    finally:
        dist.destroy_process_group()


def stage_leads(config: str, world: int, overrides: list[str]) -> list[int]:
    from loom.config import load_config

    cfg = load_config(config, overrides)
    per_stage = world // cfg.parallel.pp
    return [stage * per_stage for stage in range(cfg.parallel.pp)]


def _total(report) -> int:
    return report.params_bytes + report.grads_bytes + report.optimizer_bytes + report.activations_bytes


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world", type=int, required=True, help="the job's world size")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--rank", type=int, help="the rank to dry-run")
    which.add_argument("--most-loaded", action="store_true", help="every stage's first rank; report the largest")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides, a.b=value")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ranks = stage_leads(args.config, args.world, args.overrides) if args.most_loaded else [args.rank]
    reports = [dry_run(args.config, args.world, r, args.overrides) for r in ranks]
    report = max(reports, key=_total)
    mismatch = [m for m in (r.count_mismatch() for r in reports) if m]
    if args.json:
        print(json.dumps({**report.to_dict(), "seconds": round(time.perf_counter() - start, 2)}))
    else:
        print(report.format())
        print(f"({len(ranks)} rank(s) built in {time.perf_counter() - start:.1f} s, nothing allocated)")
    for line in mismatch:  # a shard of the wrong size: the layout is not what the model declares
        print(f"error: {line}", file=sys.stderr)
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
