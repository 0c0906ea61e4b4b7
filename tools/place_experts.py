"""Plan a balanced expert placement from a run's recorded expert load.

    python tools/place_experts.py RUN [--ep N] [--last K] [--out PATH]

Reads ``RUN/metrics.jsonl`` (each step's ``expert_load``: assignments per expert and MoE layer)
and ``RUN/config.yaml``, sums the load of the last K steps (default: all), and for each MoE layer
splits the experts into ``ep`` groups of E/ep so that the assignments each EP rank receives are as
even as the recorded load allows: largest expert first onto the least loaded rank with room, then
pairwise swaps between the most loaded rank and the others while they lower its load. Writes the
plan (default ``RUN/expert_placement.json``) and prints, per layer, the EP-rank load max/mean under
the contiguous placement and under the plan. Resume with it:

    loom-train --config RUN/config.yaml checkpoint.resume=auto parallel.expert_placement=balanced \\
        [parallel.expert_placement_plan=PATH]

Checkpoints keep experts in logical order, so the resumed run loads the same weights under the new
placement; ``parallel.ep`` may change too (plan for the new one with ``--ep``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loom import cli
from loom.parallel.expert_parallel import contiguous_placement
from loom.tools.plot_metrics import by_step, metrics_path, read_metrics


def rank_loads(load: list[float], placement: list[list[int]]) -> list[float]:
    return [sum(load[e] for e in experts) for experts in placement]


def imbalance(load: list[float], placement: list[list[int]]) -> float:
    """Max over mean of the EP ranks' load (1.0: even)."""
    ranks = rank_loads(load, placement)
    mean = sum(ranks) / len(ranks)
    return max(ranks) / mean if mean else 1.0


def balanced_placement(load: list[float], ep: int) -> list[list[int]]:
    """``ep`` groups of ``len(load) / ep`` experts with loads as even as greedy plus swaps make them."""
    per_rank = len(load) // ep
    groups, totals = [[] for _ in range(ep)], [0.0] * ep
    for e in sorted(range(len(load)), key=lambda e: (-load[e], e)):
        r = min((r for r in range(ep) if len(groups[r]) < per_rank), key=lambda r: (totals[r], r))
        groups[r].append(e)
        totals[r] += load[e]
    while _best_swap(groups, totals, load):
        pass
    return [sorted(g) for g in groups]


def _best_swap(groups, totals, load) -> bool:
    """Apply the swap between the most loaded rank and another that lowers the larger of the two most."""
    top = max(range(len(groups)), key=lambda r: totals[r])
    best, choice = totals[top], None
    for r in range(len(groups)):
        if r == top:
            continue
        for a in groups[top]:
            for b in groups[r]:
                delta = load[a] - load[b]
                worst = max(totals[top] - delta, totals[r] + delta)
                if delta > 0 and worst < best - 1e-9:
                    best, choice = worst, (r, a, b, delta)
    if choice is None:
        return False
    r, a, b, delta = choice
    groups[top][groups[top].index(a)], groups[r][groups[r].index(b)] = b, a
    totals[top] -= delta
    totals[r] += delta
    return True


def recorded_load(records: list[dict], last: int | None) -> dict[str, list[float]]:
    records = [r for r in by_step(records) if r.get("expert_load")]
    if not records:
        raise SystemExit("place_experts: the run's metrics have no expert_load (not a MoE run?)")
    records = records[-last:] if last else records
    out: dict[str, list[float]] = {}
    for r in records:
        for layer, load in r["expert_load"].items():
            acc = out.setdefault(layer, [0.0] * len(load))
            for e, n in enumerate(load):
                acc[e] += n
    return out


def plan(records: list[dict], ep: int, last: int | None = None) -> dict:
    loads = recorded_load(records, last)
    num_experts = len(next(iter(loads.values())))
    if ep < 2 or num_experts % ep:
        raise SystemExit(f"place_experts: --ep {ep} must be > 1 and divide the {num_experts} experts")
    contiguous = contiguous_placement(num_experts, ep)
    layers = {layer: balanced_placement(load, ep) for layer, load in loads.items()}
    return {"num_experts": num_experts, "ep": ep, "layers": layers,
            "ep_rank_max_over_mean": {layer: {"contiguous": imbalance(loads[layer], contiguous),
                                              "balanced": imbalance(loads[layer], layers[layer])}
                                      for layer in layers},
            "recorded_load": loads}


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (or its metrics.jsonl)")
    parser.add_argument("--ep", type=int, default=None, help="EP ranks to plan for (default: the run's parallel.ep)")
    parser.add_argument("--last", type=int, default=None, help="use the last K steps' load (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="plan file (default: RUN/expert_placement.json)")
    args = parser.parse_args(argv)
    path = metrics_path(args.run)
    if not path.is_file():
        raise SystemExit(f"place_experts: {path} not found (give a run directory or its metrics.jsonl)")
    ep = args.ep
    if ep is None:
        from loom.config import load_config

        config = path.parent / "config.yaml"
        if not config.is_file():
            raise SystemExit(f"place_experts: {config} not found; pass --ep")
        ep = load_config(str(config)).parallel.ep
    result = plan(read_metrics(path), ep, args.last)
    out = args.out or path.parent / "expert_placement.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"| layer | EP-rank load max/mean, contiguous | balanced plan (ep={ep}) |\n|---|---|---|")
    for layer, row in result["ep_rank_max_over_mean"].items():
        print(f"| {layer} | {row['contiguous']:.3f} | {row['balanced']:.3f} |")
    print(f"plan in {out}; resume with parallel.expert_placement=balanced parallel.expert_placement_plan={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
