"""Per-step metrics: one JSON object per line in ``run_dir/metrics.jsonl`` and a progress line.

Every rank logs what it knows (the true loss everywhere, pipeline stages included): rank 0 to
``metrics.jsonl`` with the progress line, rank N > 0 to ``metrics.rankN.jsonl``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, rank: int = 0, progress: "Progress | None" = None):
        self.enabled, self.rank = enabled, rank
        self.progress = progress if rank == 0 else None
        self.file = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / metrics_filename(rank), "a", buffering=1)

    def log(self, record: dict, print_line: bool = True) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.progress is not None:
            self.progress.update(record, print_line)
        elif print_line and self.rank == 0:
            print(format_line(record), flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """Rank 0's live line: step/total, loss, tokens/s, TFLOP/s and MFU where known, ETA.

    On a terminal the line is redrawn every step and kept (a newline) every log interval; in a log
    file (not a TTY) only the log-interval lines are written, one per line, with no carriage returns.
    """

    def __init__(self, total_steps: int, stream=None, first_step: int = 0):
        self.total, self.first = total_steps, first_step
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, record: dict, keep: bool) -> None:
        line = format_line(record, self.total, self.eta(record["step"]))
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if keep else ""))
            self.drawn = not keep
        elif keep:
            self.stream.write(line + "\n")
        self.stream.flush()

    def eta(self, step: int) -> float | None:
        done = step - self.first
        if done <= 0:
            return None
        return (time.perf_counter() - self.start) / done * max(0, self.total - step)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class HotExperts:
    """Streaks of steps in which one expert holds more than ``share`` of its layer's assignments.

    ``update(record)`` returns a warning the step a streak reaches ``steps`` steps (once per streak);
    a collapsing router shows here long before the loss says anything.
    """

    def __init__(self, share: float, steps: int):
        self.share, self.steps = share, steps
        self.streak: dict[tuple[str, int], int] = {}

    def update(self, record: dict) -> list[str]:
        warnings = []
        for layer, load in (record.get("expert_load") or {}).items() if self.steps else ():
            total = sum(load)
            for expert, n in enumerate(load):
                key = (layer, expert)
                self.streak[key] = self.streak.get(key, 0) + 1 if total and n > self.share * total else 0
                if self.streak[key] == self.steps:
                    warnings.append(f"WARNING: step {record['step']}: layer {layer} expert {expert} has held more "
                                    f"than {self.share:.0%} of its layer's assignments for {self.steps} steps "
                                    f"(now {n / total:.0%})")
        return warnings


def metrics_filename(rank: int) -> str:
    return "metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_line(r: dict, total: int | None = None, eta: float | None = None) -> str:
    step = f"{r['step']:>5}" if total is None else f"{r['step']:>{len(str(total))}}/{total}"
    parts = [f"step {step}", f"loss {r['loss']:.4f}", f"grad_norm {r['grad_norm']:.3f}", f"lr {r['lr']:.2e}",
             f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("tflops_per_rank") is not None:
        parts.append(f"{r['tflops_per_rank']:.3g} TFLOP/s/rank")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    parts.append(f"{r['step_time_s'] * 1000:.0f} ms")
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)
