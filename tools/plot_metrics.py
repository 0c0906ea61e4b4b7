"""Summarise a run's metrics.jsonl: print the loss trend, draw loss.png, optionally check it fell.

    python tools/plot_metrics.py runs/x/metrics.jsonl [--check-falls] [--out loss.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"plot_metrics: {path} not found")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw(losses: list[float], out: Path, size=(640, 400), pad=40) -> None:
    """The raw loss (light) and its moving average (dark), on a log axis when it spans a decade."""
    import math

    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    w, h = size[0] - 2 * pad, size[1] - 2 * pad
    lo, hi = min(losses), max(losses)
    log = lo > 0 and hi / lo > 10
    f = math.log if log else (lambda v: v)
    span = (f(hi) - f(lo)) or 1.0

    def points(values):
        return [(pad + w * i / max(1, len(values) - 1), pad + h * (1 - (f(v) - f(lo)) / span))
                for i, v in enumerate(values)]

    d.rectangle([pad, pad, pad + w, pad + h], outline="black")
    d.line(points(losses), fill=(240, 170, 170), width=1)
    d.line(points(smooth(losses, max(1, len(losses) // 50))), fill=(190, 20, 20), width=2)
    d.text((pad, 10), f"loss: {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps"
                      f"{' (log scale)' if log else ''}", fill="black")
    d.text((pad, pad + h + 8), f"min {lo:.3f}  max {hi:.3f}", fill="black")
    img.save(out)


def falls(losses: list[float], window: int = 3) -> bool:
    k = min(window, max(1, len(losses) // 3))
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: loss.png beside the metrics)")
    parser.add_argument("--check-falls", action="store_true", help="exit 1 unless the loss fell")
    args = parser.parse_args(argv)
    losses = [r["loss"] for r in read_metrics(args.metrics)]
    if not losses:
        raise SystemExit(f"plot_metrics: {args.metrics} has no steps")
    out = args.out or args.metrics.with_name("loss.png")
    draw(losses, out)
    ok = falls(losses)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({'falls' if ok else 'does NOT fall'}); "
          f"curve in {out}")
    return 0 if ok or not args.check_falls else 1


if __name__ == "__main__":
    sys.exit(main())
