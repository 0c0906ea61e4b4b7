"""Compare two runs' loss curves and throughput; optionally require that the losses agree.

    python tools/compare_runs.py A B [--assert-equal] [--rtol 1e-5] [--out compare.png]

A and B are run directories or metrics.jsonl files. Prints the steps in common, the largest relative
loss difference and where it occurs, the final losses, the median tokens/s of each and the ratio B/A,
and draws both loss curves (and tokens/s, when both runs log it) into compare.png beside B's metrics.
--assert-equal exits 1 unless both runs have the same steps and every step's loss agrees within rtol:
|a - b| <= rtol * max(|a|, |b|).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from loom import cli
from loom.tools.plot_metrics import by_step, metrics_path
from loom.tools.plots import line_plots


def load_run(path) -> tuple[Path, list[dict]]:
    """(metrics.jsonl path, one record per step in step order)."""
    metrics = metrics_path(Path(path))
    if not metrics.is_file():
        raise SystemExit(f"compare_runs: {metrics} not found (give a run directory or its metrics.jsonl)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"compare_runs: {metrics} has no steps")
    return metrics, by_step(records)


def run_names(a: Path, b: Path) -> tuple[str, str]:
    """Legend labels: the run directories' names, or the full paths when those coincide."""
    na, nb = a.parent.name or str(a), b.parent.name or str(b)
    return (na, nb) if na != nb else (str(a), str(b))


def agrees(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)  # a run that diverged matches only one that diverged too
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def rel_diff(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    scale = max(abs(a), abs(b))
    return abs(a - b) / scale if scale else 0.0


def median_rate(records: list[dict]):
    rates = [r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None]
    return statistics.median(rates) if rates else None


def fmt(v, spec: str = ".6g") -> str:
    return "-" if v is None else format(v, spec)


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="run directory or metrics.jsonl (the reference)")
    parser.add_argument("b", type=Path, help="run directory or metrics.jsonl (compared against A)")
    parser.add_argument("--assert-equal", action="store_true",
                        help="exit 1 unless both runs have the same steps and the losses agree within --rtol")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance: |a-b| <= rtol*max(|a|,|b|)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: compare.png beside B's metrics)")
    args = parser.parse_args(argv)

    path_a, ra = load_run(args.a)
    path_b, rb = load_run(args.b)
    name_a, name_b = run_names(path_a, path_b)
    loss_a = {r["step"]: r["loss"] for r in ra}
    loss_b = {r["step"]: r["loss"] for r in rb}
    common = sorted(loss_a.keys() & loss_b.keys())
    worst = max(common, key=lambda s: rel_diff(loss_a[s], loss_b[s]), default=None)
    rate_a, rate_b = median_rate(ra), median_rate(rb)

    rows = [("run", name_a, name_b),
            ("metrics", str(path_a), str(path_b)),
            ("steps", f"{len(loss_a)} ({min(loss_a)}-{max(loss_a)})", f"{len(loss_b)} ({min(loss_b)}-{max(loss_b)})"),
            ("final loss", fmt(ra[-1]["loss"]), fmt(rb[-1]["loss"])),
            ("median tokens/s", fmt(rate_a, ",.0f"), fmt(rate_b, ",.0f"))]
    width = max(len(r[1]) for r in rows) + 2
    for label, va, vb in rows:
        print(f"{label:<22}{va:<{width}}{vb}")
    print(f"{'steps in common':<22}{len(common)}")
    if worst is not None:
        print(f"{'max rel. loss diff':<22}{rel_diff(loss_a[worst], loss_b[worst]):.3e} at step {worst} "
              f"({loss_a[worst]:.8g} vs {loss_b[worst]:.8g})")
    if rate_a and rate_b is not None:
        print(f"{'throughput B/A':<22}{rate_b / rate_a:.3f}")

    losses = {name_a: (list(loss_a), list(loss_a.values())), name_b: (list(loss_b), list(loss_b.values()))}
    panels = [dict(series=losses, xlabel="step", ylabel="loss", title=f"loss: {name_a} vs {name_b}",
                   styles={name_a: dict(linewidth=2), name_b: dict(linewidth=1, linestyle="--")})]
    if rate_a is not None and rate_b is not None:
        rates = {name: ([r["step"] for r in recs if r.get("tokens_per_s") is not None],
                        [r["tokens_per_s"] for r in recs if r.get("tokens_per_s") is not None])
                 for name, recs in ((name_a, ra), (name_b, rb))}
        panels.append(dict(series=rates, xlabel="step", ylabel="tokens/s", title="throughput", logy=False))
    out = args.out or path_b.with_name("compare.png")
    line_plots(out, panels)
    print(f"plot in {out}")

    if not args.assert_equal:
        return 0
    only_a, only_b = sorted(loss_a.keys() - loss_b.keys()), sorted(loss_b.keys() - loss_a.keys())
    if only_a or only_b:
        print(f"NOT EQUAL: the step sets differ: {len(only_a)} step(s) only in {name_a} {only_a[:10]}, "
              f"{len(only_b)} only in {name_b} {only_b[:10]}")
        return 1
    bad = [s for s in common if not agrees(loss_a[s], loss_b[s], args.rtol)]
    for s in bad[:10]:
        print(f"NOT EQUAL: step {s}: loss {loss_a[s]!r} vs {loss_b[s]!r} "
              f"(relative difference {rel_diff(loss_a[s], loss_b[s]):.3e} > rtol {args.rtol:g})")
    if bad:
        print(f"NOT EQUAL: {len(bad)} of {len(common)} steps differ beyond rtol {args.rtol:g}"
              f"{' (first 10 shown)' if len(bad) > 10 else ''}")
        return 1
    print(f"EQUAL: all {len(common)} steps agree within rtol {args.rtol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
