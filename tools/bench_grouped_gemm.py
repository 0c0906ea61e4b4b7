"""Routed experts: ``torch._grouped_mm`` against the loop over experts, forward + backward.

    python tools/bench_grouped_gemm.py [--experts 8] [--hidden 256] [--ffn 512] [--tokens 4096] \\
        [--top-k 2] [--dtype bf16]

Reports each path's time and their ratio, measured in the same run (a benchmark, never a test).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from loom import cli
from loom.model.moe import GroupedExperts


def time_path(experts: GroupedExperts, x: torch.Tensor, counts: torch.Tensor, dtype, iters: int) -> float:
    def step():
        xi = x.detach().requires_grad_()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = experts(xi, counts)
        y.float().square().mean().backward()

    step()  # warm up
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    experts = GroupedExperts(args.experts, args.hidden, args.ffn).to(device)
    experts.reset_parameters(0.02)
    rows = args.tokens * args.top_k
    counts = torch.bincount(torch.randint(0, args.experts, (rows,)), minlength=args.experts).to(device)
    x = torch.randn(rows, args.hidden, device=device)
    if not experts.use_grouped_mm(device, dtype):
        print(f"torch._grouped_mm does not run on {device.type} in {args.dtype}: only the loop is available")
        return 0
    times = {}
    for grouped in (True, False):
        experts.grouped_gemm = grouped
        times[grouped] = time_path(experts, x, counts, dtype, args.iters)
    print(f"{device.type} {args.dtype} E={args.experts} h={args.hidden} F={args.ffn} rows={rows}: "
          f"grouped_mm {times[True] * 1e3:.1f} ms, loop {times[False] * 1e3:.1f} ms, "
          f"loop/grouped {times[False] / times[True]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
