"""Summarise a run's metrics.jsonl: print the loss trend, draw loss.png (and throughput.png), optionally check it fell.

    python tools/plot_metrics.py RUN [--check-falls] [--out loss.png]
    python tools/plot_metrics.py RUN --experts [--threshold 0.5] [--patience 10]

RUN is a run directory or its metrics.jsonl. --experts draws, for an MoE run, expert_load_layer{L}.png
(each expert's share of its layer's assignments, per step) and expert_imbalance.png (max/mean load per
layer), and warns about any expert that holds more than --threshold of its layer's assignments for
--patience consecutive steps or more.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from loom import cli
from loom.tools.plots import heatmap, line_plot


def metrics_path(path: Path) -> Path:
    """A run directory stands for the metrics.jsonl inside it."""
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def read_metrics(path: Path) -> list[dict]:
    path = metrics_path(path)
    if not path.is_file():
        raise SystemExit(f"plot_metrics: {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_step(records: list[dict]) -> list[dict]:
    """One record per step, in step order; a resumed run appends to metrics.jsonl, so the last record wins."""
    last = {}
    for i, r in enumerate(records):
        last[r.get("step", i + 1)] = r if "step" in r else {**r, "step": i + 1}
    return [last[s] for s in sorted(last)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw(losses: list[float], out: Path, steps: list[int] | None = None) -> None:
    """The raw loss (light) and its moving average (dark), on a log axis when it spans a decade."""
    steps = list(range(1, len(losses) + 1)) if steps is None else steps
    window = max(1, len(losses) // 20)
    line_plot(out, {"loss": (steps, losses), f"moving average ({window} steps)": (steps, smooth(losses, window))},
              "step", "loss", f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps",
              styles={"loss": dict(color="tab:red", alpha=0.3, linewidth=1),
                      f"moving average ({window} steps)": dict(color="darkred", linewidth=2)})


def draw_throughput(records: list[dict], out: Path) -> bool:
    """tokens/s over steps; False (and nothing drawn) when the run does not log tokens_per_s."""
    points = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s") is not None]
    if not points:
        return False
    steps, rates = zip(*points)
    line_plot(out, {"tokens/s": (steps, rates)}, "step", "tokens/s", "throughput", logy=False)
    return True


def falls(losses: list[float], window: int = 3) -> bool:
    k = min(window, max(1, len(losses) // 3))
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def layer_key(layer: str):
    """Layers are JSON object keys; sort and report them as numbers when they are."""
    return int(layer) if str(layer).lstrip("-").isdigit() else layer


def expert_shares(records: list[dict]) -> dict:
    """{layer: (steps, shares)}: shares[i][e] is expert e's fraction of the layer's assignments at steps[i].

    A step where the layer made no assignments has all shares 0 (no expert held anything).
    """
    out: dict = {}
    for r in records:
        for layer, load in (r.get("expert_load") or {}).items():
            total = sum(load)
            steps, shares = out.setdefault(layer_key(layer), ([], []))
            steps.append(r["step"])
            shares.append([c / total if total else 0.0 for c in load])
    return {layer: out[layer] for layer in sorted(out, key=lambda k: (isinstance(k, str), k))}


def hot_experts(records: list[dict], threshold: float = 0.5, patience: int = 10) -> list[tuple]:
    """(layer, expert, first_step, last_step) for every run of at least ``patience`` consecutive logged steps
    in which one expert held more than ``threshold`` (a fraction) of its layer's assignments.

    A collapsed router sends most tokens to one expert; a brief spike is normal early in training, so only
    streaks of ``patience`` steps count. An expert with several such streaks is reported once per streak.
    """
    found = []
    for layer, (steps, shares) in expert_shares(by_step(records)).items():
        n_experts = max((len(s) for s in shares), default=0)
        for expert in range(n_experts):
            start = None
            for i, row in enumerate(shares + [None]):  # the sentinel closes a streak that lasts to the end
                hot = row is not None and expert < len(row) and row[expert] > threshold
                if hot and start is None:
                    start = i
                elif not hot and start is not None:
                    if i - start >= patience:
                        found.append((layer, expert, steps[start], steps[i - 1]))
                    start = None
    return sorted(found, key=lambda h: (isinstance(h[0], str), h[0], h[1], h[2]))


def plot_experts(records: list[dict], out_dir: Path) -> list[Path]:
    """expert_load_layer{L}.png per MoE layer and expert_imbalance.png; returns the paths written."""
    import numpy as np

    written, imbalance = [], {}
    for layer, (steps, shares) in expert_shares(records).items():
        n_experts = max(len(s) for s in shares)
        matrix = np.full((n_experts, len(steps)), np.nan)
        for i, row in enumerate(shares):
            matrix[:len(row), i] = row
        written.append(heatmap(out_dir / f"expert_load_layer{layer}.png", matrix, "step", "expert",
                               f"layer {layer}: each expert's share of the layer's assignments",
                               "share of assignments", x=steps, vmin=0.0, vmax=1.0))
        # Shares are proportional to the load, so max/mean of the shares is max/mean of the load.
        imbalance[f"layer {layer}"] = (steps, [max(row) * len(row) if sum(row) else math.nan for row in shares])
    written.append(line_plot(out_dir / "expert_imbalance.png", imbalance, "step", "max / mean expert load",
                             "expert load imbalance (1 = perfectly balanced)", logy=False))
    return written


def experts_main(args, records: list[dict]) -> int:
    records = by_step(records)
    if not any(r.get("expert_load") for r in records):
        print(f"plot_metrics: {metrics_path(args.metrics)} has no expert_load (not an MoE run?)", file=sys.stderr)
        return 1
    out_dir = metrics_path(args.metrics).parent
    written = plot_experts(records, out_dir)
    hot = hot_experts(records, args.threshold, args.patience)
    for layer, expert, first, last in hot:
        n = sum(1 for r in records if first <= r["step"] <= last)
        print(f"WARNING: layer {layer} expert {expert} held more than {args.threshold * 100:g}% of its layer's "
              f"assignments for {n} consecutive steps (steps {first}-{last})")
    print(f"expert load: {len(written) - 1} layer(s) over {len(records)} steps, {len(hot)} hot expert streak(s); "
          f"plots in {', '.join(str(p) for p in written)}")
    return 0


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="run directory or its metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: loss.png beside the metrics)")
    parser.add_argument("--check-falls", action="store_true", help="exit 1 unless the loss fell")
    parser.add_argument("--experts", action="store_true", help="plot MoE expert load and warn about hot experts")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="--experts: warn when one expert holds more than this fraction of its layer's assignments")
    parser.add_argument("--patience", type=int, default=10,
                        help="--experts: ... for at least this many consecutive steps")
    args = parser.parse_args(argv)
    records = read_metrics(args.metrics)
    if args.experts:
        return experts_main(args, records)
    records = by_step(records)
    losses = [r["loss"] for r in records]
    if not losses:
        raise SystemExit(f"plot_metrics: {metrics_path(args.metrics)} has no steps")
    out = args.out or metrics_path(args.metrics).with_name("loss.png")
    draw(losses, out, [r["step"] for r in records])
    throughput = out.with_name("throughput.png")
    if draw_throughput(records, throughput):
        print(f"throughput in {throughput}")
    ok = falls(losses)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({'falls' if ok else 'does NOT fall'}); "
          f"curve in {out}")
    return 0 if ok or not args.check_falls else 1


if __name__ == "__main__":
    sys.exit(main())
