"""Per-step metrics: one JSON object per line in ``run_dir/metrics.jsonl`` and a progress line.

Every rank logs what it knows (the true loss everywhere, pipeline stages included): rank 0 to
``metrics.jsonl`` with the progress line, rank N > 0 to ``metrics.rankN.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, rank: int = 0):
        self.enabled, self.rank = enabled, rank
        self.file = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / metrics_filename(rank), "a", buffering=1)

    def log(self, record: dict, print_line: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if print_line and self.rank == 0:
            print(format_line(record), flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def metrics_filename(rank: int) -> str:
    return "metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"


def format_line(r: dict) -> str:
    return (f"step {r['step']:>5} | loss {r['loss']:.4f} | grad_norm {r['grad_norm']:.3f} | lr {r['lr']:.2e} "
            f"| {r['tokens_per_s']:,.0f} tok/s | {r['step_time_s'] * 1000:.0f} ms")
