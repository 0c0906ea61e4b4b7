"""A MoE model's training steps, measured: time, throughput, TFLOP/s, MFU, memory, bytes, expert load.

    torchrun --nproc-per-node 4 tools/bench_moe.py --config launch/configs/models/tiny/mixtral_8x7b.yaml \\
        [--steps 10] [--warmup 2] [--peak-tflops X] [--routing real|balanced|both] [a.b=value ...]

Runs real training steps (Trainer.train_step) under the config's layout and reports, over the timed
steps, the median, min and max of each figure, for the router's own assignment (``real``) and a
forced uniform one (``balanced``: token t's choice j goes to expert (t k + j) mod E, what published
MoE tables measure), side by side by default, each after its own warm-up steps. What each figure is:

- step time: rank 0's wall time of forward, backward, optimizer step and MoE statistics;
  tokens/s: the global batch's tokens over it, and that over the world size per rank.
- TFLOP/s per rank: engine/train/flops.py's model FLOPs of the step's global batch (causal attention
  over the real packed document lengths, routed experts counting the kept assignments only, the LM
  head; x3 for backward, more with recompute) over the step time and the world size.
- MFU: that over ``--peak-tflops``; by default the device table's bf16 peak (H100/H200 989, A100 312)
  on CUDA, and on CPU the fp32 matmul throughput measured on every rank at once in this run (so MFU
  there says how close the step comes to the machine's own matmul speed).
- peak memory per rank: the memory report (engine/train/memory.py) with activations measured in the
  first warm-up step; on CUDA also the allocator's peak.
- bytes per collective kind, per rank and step, counted at the torch.distributed call boundary
  (tools/traffic.py), beside the theoretical volume of the layout (uniform routing) and their ratio,
  per kind and, in bench.json, per group. Under real routing the all-to-all ratio is the cost of
  imbalance in bytes.
- expert load per MoE layer: max/mean and coefficient of variation of the assignments per expert;
  per EP rank: the assignments its experts receive, max/mean over the ep ranks (the imbalance that
  runs a rank out of memory) under the run's expert placement (``parallel.expert_placement``);
  dropped assignments; the auxiliary loss.

Writes ``bench.json``, ``expert_load_<routing>_layer<L>.png`` (expert x step heatmaps),
``ep_rank_load.png`` and ``step_time.png`` in the run directory (``train.run_dir``, default
runs/bench_moe). A benchmark, never a test: the figures are measured, nothing is asserted.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from loom import cli

ROUTINGS = ("real", "balanced")
DIMS = ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "mp", "ep", "etp", "edp", "ep_etp", "emp", "world")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps per routing")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each routing's timed ones")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-rank peak for MFU (default: see above)")
    p.add_argument("--routing", choices=ROUTINGS + ("both",), default="both")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be at least 1 (the first warm-up step measures activations)")
    return args


def measure_matmul_tflops(device: torch.device, n: int = 1024, reps: int = 5) -> float:
    """This rank's fp32 matmul TFLOP/s, measured while every rank measures (they share the machine)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    dist.barrier()
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    dist.barrier()
    return 2 * n**3 / best / 1e12


def peak_tflops(args, device) -> tuple[float, str]:
    from loom.train.flops import device_peak_tflops

    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    table = device_peak_tflops(device)
    if table:
        return table, f"device table ({torch.cuda.get_device_name(device)}, bf16 dense)"
    return measure_matmul_tflops(device), "fp32 1024^3 matmul measured on every rank at once in this run"


def global_doc_lengths(trainer, step: int) -> list[int]:
    """Every document length of step ``step``'s global batch (the layout does not change it)."""
    from loom.data import rank_microbatches
    from loom.train.multimodal import MultimodalDataset

    share = (trainer.sampler.indices(step), 0, 1, trainer.cfg.train.micro_batch_size)
    if isinstance(trainer.dataset, MultimodalDataset):
        mbs = trainer.dataset.microbatches(*share)
    else:
        mbs = rank_microbatches(trainer.dataset, *share)
    return [int(n) for mb in mbs for n in torch.diff(mb.cu_seqlens).tolist()]


def set_routing(model, balanced: bool) -> None:
    from loom.model.moe import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            module.cfg.force_balanced_routing = balanced


def run_routing(trainer, counter, theory, routing: str, warmup: int, steps: int, first: bool, peak: float,
                progress) -> list[dict]:
    """``warmup`` then ``steps`` timed steps under ``routing``; one record per timed step with this rank's
    bytes, counted and (``theory(loss_tokens)``: (kind, dim) -> bytes) expected. ``progress``: rank 0's
    live line (engine/train/metrics.py), or None."""
    from loom.train.flops import step_flops
    from loom.tools.traffic import by_kind

    set_routing(trainer.model, routing == "balanced")
    records = []
    for i in range(warmup + steps):
        docs = global_doc_lengths(trainer, trainer.step)
        counter.reset()
        record = trainer.measured_step() if first and i == 0 else trainer.train_step()
        loads = {k: sum(v) for k, v in record["expert_load"].items()}
        flops = step_flops(trainer.cfg.model, docs, loads, trainer.cfg.train.recompute).total
        record["model_flops"] = flops
        record["tflops_per_rank"] = flops / record["step_time_s"] / trainer.groups.world_size / 1e12
        record["mfu"] = record["tflops_per_rank"] / peak
        if progress is not None:
            progress.update(record, keep=True)
        if i < warmup:
            continue
        expected = theory(record["loss_tokens"])
        record.update(bytes=counter.by_kind(), theory_bytes=by_kind(expected),
                      theory_by_group=theory_by_group(expected, trainer.groups),
                      bytes_by_group={f"{kind} {_ranks(ranks)}": n for (kind, ranks), n in counter.bytes.items()})
        trainer.metrics.log(record, print_line=False)
        records.append(record)
    return records


# ----------------------------------------------------------------------------- figures


def spread(values) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def load_figures(expert_load: dict, placement: dict | None, groups: int) -> dict:
    """Per layer: max/mean and CV of the experts' load; per ep rank (``placement``: the experts of each,
    by layer): its experts' load per EP group."""
    out = {}
    for layer, load in expert_load.items():
        t = torch.tensor(load, dtype=torch.float64)
        mean = t.mean().clamp(min=1e-12)
        row = {"max_over_mean": float(t.max() / mean), "cv": float(t.std(unbiased=False) / mean)}
        if placement is not None:
            ranks = torch.stack([t[experts].sum() / groups for experts in placement[int(layer)]])
            row["ep_rank_load"] = ranks.tolist()
            row["ep_rank_max_over_mean"] = float(ranks.max() / ranks.mean().clamp(min=1e-12))
        out[layer] = row
    return out


def summarize(records: list[dict], world: int, peak: float, placement, groups: int) -> dict:
    times = [r["step_time_s"] for r in records]
    tflops = [r["model_flops"] / r["step_time_s"] / world / 1e12 for r in records]
    loads = [load_figures(r["expert_load"], placement, groups) for r in records]
    layers = list(loads[0])
    s = {"step_time_s": spread(times), "tokens_per_s": spread([r["tokens_per_s"] for r in records]),
         "tokens_per_s_per_rank": spread([r["tokens_per_s"] / world for r in records]),
         "tflops_per_rank": spread(tflops), "mfu": spread([x / peak for x in tflops]),
         "dropped_tokens": spread([r["dropped_tokens"] for r in records]),
         "aux_loss": spread([r["aux_loss"] for r in records]),
         "expert_max_over_mean": {k: spread([f[k]["max_over_mean"] for f in loads]) for k in layers},
         "expert_cv": {k: spread([f[k]["cv"] for f in loads]) for k in layers}}
    if placement is not None:
        s["ep_rank_max_over_mean"] = {k: spread([f[k]["ep_rank_max_over_mean"] for f in loads]) for k in layers}
        s["ep_rank_load"] = {k: [statistics.mean(f[k]["ep_rank_load"][r] for f in loads)
                                 for r in range(len(placement[int(k)]))] for k in layers}
    return s


def traffic(records_by_rank: list[list[dict]]) -> dict:
    """Per kind: counted bytes per rank and step (median, min, max over ranks and steps), the theory
    (median over ranks and steps) and, per step, the ratio of the world's count to the world's theory
    (the theory's data-dependent terms are means over ranks; tools/traffic.py)."""
    from loom.tools.traffic import KINDS

    out = {}
    steps = list(zip(*records_by_rank))  # per step: every rank's record
    for kind in KINDS:
        row = {"counted": spread([r["bytes"][kind] for recs in records_by_rank for r in recs]),
               "theory": statistics.median(r["theory_bytes"][kind] for recs in records_by_rank for r in recs)}
        if all(sum(r["theory_bytes"][kind] for r in step) for step in steps):
            row["ratio"] = spread([sum(r["bytes"][kind] for r in step) / sum(r["theory_bytes"][kind] for r in step)
                                   for step in steps])
        out[kind] = row
    return out


def group_traffic(records_by_rank: list[list[dict]], labels: list[dict]) -> list:
    """Rows (rank, kind, group, counted and expected bytes per step, medians): every group a rank used
    or was expected to use."""
    rows = []
    for rank, (recs, label) in enumerate(zip(records_by_rank, labels)):
        keys = sorted({k for r in recs for k in (*r["bytes_by_group"], *r["theory_by_group"])})
        for key in keys:
            kind, ranks = key.split(" ", 1)
            rows.append({"rank": rank, "kind": kind, "group": label.get(ranks, "?"), "ranks": ranks,
                         "counted": statistics.median(r["bytes_by_group"].get(key, 0) for r in recs),
                         "theory": statistics.median(r["theory_by_group"].get(key, 0) for r in recs)})
    return rows


def fmt(x: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{x['median'] * scale:.{digits}g} [{x['min'] * scale:.{digits}g}, {x['max'] * scale:.{digits}g}]"


def markdown(result: dict) -> str:
    modes = list(result["routing"])
    rows = [("step time (ms)", "step_time_s", 1e3), ("tokens/s", "tokens_per_s", 1),
            ("tokens/s per rank", "tokens_per_s_per_rank", 1), ("model TFLOP/s per rank", "tflops_per_rank", 1),
            ("MFU (%)", "mfu", 100), ("dropped assignments", "dropped_tokens", 1), ("aux loss", "aux_loss", 1)]
    lines = [f"| figure (median [min, max] over {result['steps']} steps) | " + " | ".join(modes) + " |",
             "|---|" + "---|" * len(modes)]
    for name, key, scale in rows:
        cells = [fmt(result["routing"][m]["summary"][key], scale) for m in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for layer in result["routing"][modes[0]]["summary"]["expert_max_over_mean"]:
        for label, key in (("expert load max/mean", "expert_max_over_mean"), ("expert load CV", "expert_cv"),
                           ("EP rank load max/mean", "ep_rank_max_over_mean")):
            if key in result["routing"][modes[0]]["summary"]:
                cells = [fmt(result["routing"][m]["summary"][key][layer]) for m in modes]
                lines.append(f"| layer {layer} {label} | " + " | ".join(cells) + " |")
    for kind in result["routing"][modes[0]]["traffic"]:
        cells = []
        for m in modes:
            row = result["routing"][m]["traffic"][kind]
            ratio = f" = {fmt(row['ratio'], digits=4)} x theory" if row.get("ratio") else ""
            cells.append(f"{fmt(row['counted'], 2.0**-20)}{ratio}")
        theory = result["routing"][modes[0]]["traffic"][kind]["theory"]
        label = f"{kind} MiB/rank/step (theory {theory / 2**20:.3g})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    mem = result["memory_peak_bytes"]
    lines.append("| peak memory per rank (MiB, max over ranks; both routings) | "
                 + " | ".join(f"{max(mem) / 2**20:.1f}" for _ in modes) + " |")
    return "\n".join(lines)


def draw(result: dict, run_dir: Path) -> None:
    from loom.tools.plots import heatmap, line_plot

    for mode, data in result["routing"].items():
        steps = [r["step"] for r in data["records"]]
        for layer in data["records"][0]["expert_load"]:
            matrix = [[r["expert_load"][layer][e] for r in data["records"]]
                      for e in range(len(data["records"][0]["expert_load"][layer]))]
            heatmap(run_dir / f"expert_load_{mode}_layer{layer}.png", matrix, xlabel="step", ylabel="expert",
                    title=f"layer {layer} expert load, {mode} routing", colorbar_label="assignments", x=steps)
    series = {mode: (list(range(1, len(d["records"]) + 1)), [r["step_time_s"] * 1e3 for r in d["records"]])
              for mode, d in result["routing"].items()}
    line_plot(run_dir / "step_time.png", series, xlabel="timed step", ylabel="step time (ms)", title="step time")
    ranks = {}
    for mode, d in result["routing"].items():
        for layer, loads in d["summary"].get("ep_rank_load", {}).items():
            ranks[f"{mode} layer {layer}"] = (list(range(len(loads))), loads)
    if ranks:
        line_plot(run_dir / "ep_rank_load.png", ranks, xlabel="ep rank", ylabel="assignments per step (mean)",
                  title="token load per EP rank")


@cli.entry
def main(argv=None) -> int:
    args = parse_args(argv)
    from loom.config import load_config
    from loom.parallel.expert_parallel import expert_placement
    from loom.parallel.mesh import init_distributed
    from loom.train.metrics import Progress
    from loom.train.trainer import Trainer, build_groups
    from loom.tools.traffic import CollectiveCounter, expected_traffic

    overrides = ["train.run_dir=runs/bench_moe", "checkpoint.save_interval=0", "checkpoint.resume=none", *args.overrides]
    cfg = load_config(args.config, overrides)
    if not cfg.model.moe.num_experts:
        raise SystemExit(f"bench_moe: {args.config} has no MoE layers (model.moe.num_experts=0)")
    modes = ROUTINGS if args.routing == "both" else (args.routing,)
    cfg.train.steps = max(cfg.train.steps, len(modes) * (args.warmup + args.steps))
    init_distributed(device=cfg.runtime.device)
    trainer = Trainer(cfg, build_groups(cfg))
    world, rank, p = dist.get_world_size(), dist.get_rank(), cfg.parallel
    peak, peak_source = peak_tflops(args, trainer.device)
    peak = statistics.mean(_gather(peak))  # one figure for the job: the ranks' mean
    placement = expert_placement(cfg) if p.ep > 1 else None
    edp_groups = world // (p.ep * p.resolved_etp)
    numel = {"dense": trainer.memory.formula["dense_params"], "expert": trainer.memory.formula["expert_params"]}
    theory = functools.partial(expected_traffic, cfg, world, numel, trainer.groups.pp_rank)
    labels = _gather(group_labels(trainer.groups))
    result = {"config": args.config, "overrides": args.overrides, "layout": trainer.memory.layout, "world": world,
              "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak, "peak_source": peak_source,
              "routing": {}}
    counter = CollectiveCounter()
    progress = Progress(cfg.train.steps) if rank == 0 else None
    for i, mode in enumerate(modes):
        with counter:
            records = run_routing(trainer, counter, theory, mode, args.warmup, args.steps, (i == 0), peak, progress)
        everyone = _gather(records)
        result["routing"][mode] = {"records": records, "summary": summarize(records, world, peak, placement,
                                                                            edp_groups),
                                   "traffic": traffic(everyone),
                                   "traffic_by_group": group_traffic(everyone, labels)}
    memory = trainer.memory
    held = memory.params_bytes + memory.grads_bytes + memory.optimizer_bytes + memory.activations_bytes
    if trainer.device.type == "cuda":
        held = max(held, torch.cuda.max_memory_allocated(trainer.device))
    result["memory_peak_bytes"] = _gather(held)
    trainer.metrics.close()
    if rank == 0:
        run_dir = Path(cfg.train.run_dir)
        (run_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"\n{cfg.model.num_layers}-layer MoE, {cfg.model.moe.num_experts} experts top-{cfg.model.moe.top_k}, "
              f"{result['layout']}, {world} ranks; peak {peak:.3g} TFLOP/s per rank ({peak_source})\n")
        print(markdown(result))
        draw(result, run_dir)
        print(f"\nbench.json and plots in {run_dir}")
    dist.destroy_process_group()
    return 0


def _ranks(ranks) -> str:
    return ",".join(map(str, ranks))


def group_labels(groups) -> dict[str, str]:
    """This rank's groups by their ranks ("0,2"): the parallel dimensions that share them ("dp/ep_etp")."""
    labels: dict[str, list[str]] = {}
    for name in DIMS:
        ranks = list(range(dist.get_world_size())) if name == "world" else groups.ranks(name)
        labels.setdefault(_ranks(ranks), []).append(name)
    return {ranks: "/".join(names) for ranks, names in labels.items()}


def theory_by_group(theory: dict, groups) -> dict[str, float]:
    """``expected_traffic``'s (kind, dim) bytes keyed like the counter's: "kind ranks"."""
    out: dict[str, float] = {}
    for (kind, dim), nbytes in theory.items():
        ranks = list(range(dist.get_world_size())) if dim == "world" else groups.ranks(dim)
        if len(ranks) > 1:
            key = f"{kind} {_ranks(ranks)}"
            out[key] = out.get(key, 0) + nbytes
    return out


def _gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


if __name__ == "__main__":
    sys.exit(main())
