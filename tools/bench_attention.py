"""Attention kernels: correctness on CPU, throughput on CUDA.

    python tools/bench_attention.py                 # CPU: Triton (interpreted) vs reference, timings
    python tools/bench_attention.py --dtype bf16    # CUDA: TFLOP/s of triton / flash-attn / SDPA

On CUDA the batch is `--seqs` sequences of `--seqlen` tokens (default 8 x 4096), each cut into
documents of mixed lengths; FLOPs are counted per document (causal: L(L+1)/2 visible pairs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when loom.kernels.flash_attn is first imported

from loom import cli  # noqa: E402
from loom import kernels  # noqa: E402
from loom.kernels import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mixed_lengths(seqs: int, seqlen: int, seed: int = 0) -> list[int]:
    """Document lengths: each sequence of `seqlen` tokens cut at random points (a few long, many short)."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    for _ in range(seqs):
        cuts = sorted(torch.randint(1, seqlen, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist())
        edges = [0] + cuts + [seqlen]
        lens += [b - a for a, b in zip(edges, edges[1:]) if b > a]
    return lens


def attention_flops(lens: list[int], heads: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: two matmuls (QK^T, PV) of 2*D FLOPs per visible (q, k) pair and head."""
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    return 4.0 * heads * head_dim * pairs


def make_batch(lens, hq, hkv, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + lens).cumsum(0).to(device=device, dtype=torch.int32)
    return q, k, v, cu, max(lens)


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def cpu_check(args) -> int:
    """Triton (interpreted) against the reference on a small packed batch; returns an exit code."""
    lens = [1, 37, 100, 62, 0, 23]
    q, k, v, cu, mx = make_batch(lens, 4, 2, 32, torch.float32, "cpu")
    dout = torch.randn_like(q)
    results = {}
    warm = make_batch([3], 4, 2, 32, torch.float32, "cpu")  # first-call setup out of the timings
    kernels.attention(*warm[:3], warm[3], warm[3], 3, 3, backend="triton").sum().backward()
    for backend in ("triton", "torch"):
        for x in (q, k, v):
            x.grad = None
        t0 = time.perf_counter()
        out, lse = kernels.attention(q, k, v, cu, cu, mx, mx, backend=backend, return_lse=True)
        t1 = time.perf_counter()
        out.backward(dout)
        t2 = time.perf_counter()
        results[backend] = (out.detach(), lse, q.grad.clone(), k.grad.clone(), v.grad.clone())
        print(f"{backend:>7}: forward {t1 - t0:7.3f} s   backward {t2 - t1:7.3f} s"
              + ("   (Triton interpreter)" if backend == "triton" else "   (reference math, lse requested)"))
    ref_out, ref_lse = reference.attention_forward(q, k, v, cu, cu, mx, mx)
    ref_grads = reference.attention_backward(dout, q, k, v, ref_out, ref_lse, cu, cu, mx, mx)
    errs = dict(zip(("out", "lse", "dq", "dk", "dv"),
                    (_max_err(a, b) for a, b in zip(results["triton"], (ref_out, ref_lse, *ref_grads)))))
    print(f"docs {lens}, Hq=4, Hkv=2, D=32, fp32, causal: triton vs reference max |err| "
          + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
    ok = all(e <= 2e-5 for e in errs.values())
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def _time_ms(fn, reps: int) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=max(1, reps // 4), rep=reps)


def cuda_bench(args) -> int:
    dtype = DTYPES[args.dtype]
    lens = mixed_lengths(args.seqs, args.seqlen)
    q, k, v, cu, mx = make_batch(lens, args.heads, args.kv_heads, args.head_dim, dtype, "cuda")
    dout = torch.randn_like(q)
    flops = attention_flops(lens, args.heads, args.head_dim, args.causal)
    print(f"{len(lens)} documents in {args.seqs} x {args.seqlen} tokens (longest {mx}); Hq={args.heads} "
          f"Hkv={args.kv_heads} D={args.head_dim} {args.dtype} causal={args.causal}")
    backends = ["triton", "torch"] + (["flash_attn"] if kernels.flash_attn_available() else [])
    for backend in backends:
        def fwd():
            return kernels.attention(q, k, v, cu, cu, mx, mx, causal=args.causal, backend=backend)

        with torch.no_grad():
            t_fwd = _time_ms(fwd, args.reps)
        out = fwd()
        t_bwd = _time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), args.reps)
        name = "sdpa" if backend == "torch" else backend
        print(f"{name:>10}: forward {t_fwd:8.3f} ms {flops / t_fwd / 1e9:7.1f} TFLOP/s   "
              f"backward {t_bwd:8.3f} ms {2.5 * flops / t_bwd / 1e9:7.1f} TFLOP/s")
    return 0


@cli.entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--reps", type=int, default=100, help="milliseconds of timed repetitions (do_bench)")
    args = p.parse_args(argv)
    return cuda_bench(args) if torch.cuda.is_available() else cpu_check(args)


if __name__ == "__main__":
    sys.exit(main())
