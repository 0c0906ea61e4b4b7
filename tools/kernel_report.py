"""Registers, spills and shared memory of every Triton attention kernel the dispatch can pick, per GPU target.

    python -m loom.tools.kernel_report                 # summary table (markdown): sm_80, sm_86, sm_90
    python -m loom.tools.kernel_report --full          # one row per variant
    python -m loom.tools.kernel_report --check         # exit 1 on a failed compile, a kernel over a target's
                                                  # shared memory, or a spill the rules forbid
    python -m loom.tools.kernel_report --quick         # a few variants (a smoke check)

No GPU is needed: Triton compiles ahead of time for an explicit target (its NVIDIA backend ships
ptxas). A variant is a kernel (fwd, dq, dkdv) x dtype x head dim x mask (causal, causal with
positions, bidirectional) x GQA (group 1 or 4). Each is compiled the way a launch compiles it:
loom.kernels.flash_attn's own argument packer and ``_meta`` give the arguments and constexprs, realistic
CPU tensors stand in for the device ones (aligned storage, real strides), and the JIT's binder
(``create_function_from_signature``, what ``JITFunction.create_binder`` builds) with
``JITFunction._pack_args`` derive the signature, the specialisations (integers equal to 1 become
constants, pointers and integers divisible by 16 get ``tt.divisibility``) and the options exactly
as ``JITFunction.run`` does before it calls ``triton.compile``. Variants that bind identically
(e.g. head dims 80, 96 and 128, which share BLOCK_D and alignment) are compiled once.

Registers and spills come from the cubin (``cuobjdump -res-usage``: REG, and STACK, the stack
frame, which in these kernels (no local arrays, no calls) holds only spilled registers); shared
memory is Triton's ``metadata.shared``, what its launcher checks against the device's opt-in limit.
Compiles land in Triton's cache (~/.triton/cache or TRITON_CACHE_DIR): a second run takes seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# The kernels must be decorated as compilable JIT functions, not interpreted ones.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; set, it silences a warning

import torch  # noqa: E402

from loom import cli

KIB = 1024
# Shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
TARGETS = {"sm_80": (80, 163 * KIB), "sm_86": (86, 99 * KIB), "sm_90": (90, 227 * KIB)}
KERNEL_NAMES = ("fwd", "dq", "dkdv")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (16, 32, 64, 72, 80, 96, 128, 256)
MASKS = {"causal": (True, False), "causal_pos": (True, True), "bidir": (False, False)}
GROUPS = (1, 4)
HEADS, TOKENS, DOCS = 8, 4096, 4
# Where no variant may spill: fp32 everywhere (every shipped config trains in fp32), the half
# types at the head dims of the common models (64: many; 72: SigLIP; 96; 128: Llama, Qwen).
NO_SPILL = {"fp32": HEAD_DIMS, "fp16": (64, 72, 96, 128), "bf16": (64, 72, 96, 128)}
def spills(r: dict) -> bool:
    """Whether a compiled variant spills registers (any stack frame: see the module docstring)."""
    return r["spill"] > 0


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    head_dim: int
    mask: str
    group: int


def variants(quick: bool = False) -> list[Variant]:
    if quick:
        return [Variant(k, d, hd, "causal", 4) for k in KERNEL_NAMES for d, hd in (("bf16", 72), ("fp32", 128))]
    return [Variant(k, d, hd, m, g) for d in DTYPES for hd in HEAD_DIMS for k in KERNEL_NAMES for m in MASKS
            for g in GROUPS]


def launch(v: Variant):
    """(jit function, positional arguments, keyword constexprs/options) of this variant's launch on CUDA."""
    from loom.kernels import flash_attn as F

    causal, has_pos = MASKS[v.mask]
    dt, hkv = DTYPES[v.dtype], HEADS // v.group
    q = torch.empty(TOKENS, HEADS, v.head_dim, dtype=dt)
    k, val = (torch.empty(TOKENS, hkv, v.head_dim, dtype=dt) for _ in range(2))
    lse, delta = torch.empty(TOKENS, HEADS), torch.empty(TOKENS, HEADS)
    cu = torch.zeros(DOCS + 1, dtype=torch.int32)
    pos = torch.zeros(TOKENS, dtype=torch.int32) if has_pos else cu
    table = torch.zeros(2 * TOKENS, dtype=torch.int32)
    scale = 1.0 / math.sqrt(v.head_dim)
    fn, pack = F.LAUNCHES[v.kernel]
    if v.kernel == "fwd":
        args = pack(q, k, val, torch.empty_like(q), lse, pos, pos, cu, cu, scale, table)
    elif v.kernel == "dq":
        args = pack(q, k, val, torch.empty_like(q), torch.empty_like(q), lse, delta, pos, pos, cu, cu, scale, table)
    else:
        args = pack(q, k, val, torch.empty_like(q), torch.empty_like(k), torch.empty_like(val), lse, delta, pos, pos,
                    cu, cu, scale, table)
    return fn, args, F._meta(v.kernel, torch.device("cuda"), dt, v.head_dim, causal, has_pos)


def bind(v: Variant, arch: int):
    """What ``JITFunction.run`` derives before compiling: (fn, target, ASTSource args, options, cache key)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, args, meta = launch(v)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("loom.kernels.flash_attn was imported with TRITON_INTERPRET set: run this tool in a fresh "
                           "process")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(meta, debug=triton.knobs.runtime.debug,
                  instrumentation_mode=triton.knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=triton.knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.__name__, arch, repr(specialization), repr(sorted(options.__dict__.items())))
    return fn, target, (signature, constexprs, attrs), options, key


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack frame bytes) of the kernel in ``cubin``."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>``: {regs, spill, shared} or {error}."""
    import triton
    from triton.compiler import ASTSource

    try:
        fn, target, src_args, options, _ = bind(v, arch)
        kernel = triton.compile(ASTSource(fn, *src_args), target=target, options=options.__dict__)
        regs, stack = _resources(kernel.asm["cubin"])
        return dict(regs=regs, spill=stack, shared=kernel.metadata.shared)
    except Exception as e:  # noqa: BLE001 - a failed compile is a result of the sweep
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}")


def _compile_job(job):
    v, arch = job
    return compile_variant(v, arch)


def sweep(vs: list[Variant], targets=tuple(TARGETS), jobs: int | None = None) -> dict:
    """{(variant, target): result}; variants that bind identically are compiled once."""
    unique, key_of = {}, {}
    for v in vs:
        for t in targets:
            key = bind(v, TARGETS[t][0])[-1]
            key_of[v, t] = key
            unique.setdefault(key, (v, TARGETS[t][0]))
    jobs = jobs or os.cpu_count() or 1
    results = []
    with ProcessPoolExecutor(jobs) if jobs > 1 and len(unique) > 1 else contextlib.nullcontext() as pool:
        for r in (pool.map if pool else map)(_compile_job, unique.values()):
            results.append(r)
            if len(results) % 50 == 0:
                print(f"compiled {len(results)} of {len(unique)}", file=sys.stderr, flush=True)
    done = dict(zip(unique, results))
    return {vt: done[key] for vt, key in key_of.items()}


def problems(results: dict) -> list[str]:
    """Failed compiles, kernels over a target's shared memory, spills where NO_SPILL forbids them."""
    out = []
    for (v, t), r in sorted(results.items(), key=lambda item: (repr(item[0][0]), item[0][1])):
        name = f"{t} {v.kernel} {v.dtype} D={v.head_dim} {v.mask} group={v.group}"
        if "error" in r:
            out.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["shared"] > TARGETS[t][1]:
            out.append(f"{name}: needs {r['shared'] / KIB:.1f} KB of shared memory, {t} allows {TARGETS[t][1] // KIB}")
        if spills(r) and v.head_dim in NO_SPILL[v.dtype]:
            out.append(f"{name}: spills ({r['spill']} B stack per thread, {r['regs']} registers)")
    return out


def _cell(rs: list[dict], limit: int) -> str:
    if any("error" in r for r in rs):
        return "FAILS"
    regs, spill, shared = (max(r[k] for r in rs) for k in ("regs", "spill", "shared"))
    flag = " (over)" if shared > limit else ""
    return f"{regs} / {spill} / {shared / KIB:.0f}{flag}"


def table(results: dict, full: bool = False) -> str:
    """Markdown: regs / spill bytes per thread / shared KB per target; the summary takes the max over
    masks and GQA groups."""
    from loom.kernels import flash_attn as F

    targets = sorted({t for _, t in results})
    head = "| dtype | D | kernel |" + (" mask | group |" if full else "") + " blocks M,N warps stages [maxnreg] |"
    head += "".join(f" {t} |" for t in targets)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows: dict = {}
    for (v, t), r in results.items():
        key = (v.dtype, v.head_dim, v.kernel) + ((v.mask, v.group) if full else ())
        rows.setdefault(key, {}).setdefault(t, []).append(r)
    order = {n: i for i, n in enumerate(list(DTYPES) + list(KERNEL_NAMES) + list(MASKS))}
    for key in sorted(rows, key=lambda k: tuple(order.get(x, x) for x in k)):
        dtype, hd, kernel = key[:3]
        c = F._config(torch.device("cuda"), hd, DTYPES[dtype], kernel)
        blocks = f"{c['BLOCK_M']},{c['BLOCK_N']} {c['num_warps']} {c['num_stages']}" + \
            (f" r{c['maxnreg']}" if "maxnreg" in c else "")
        extra = f" {key[3]} | {key[4]} |" if full else ""
        cells = "".join(f" {_cell(rows[key][t], TARGETS[t][1])} |" for t in targets)
        lines.append(f"| {dtype} | {hd} | {kernel} |{extra} {blocks} |{cells}")
    return "\n".join(lines)


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="one row per variant")
    parser.add_argument("--quick", action="store_true", help="a few variants only")
    parser.add_argument("--check", action="store_true", help="exit 1 on any problem (see problems())")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of " + ", ".join(TARGETS))
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    args = parser.parse_args(argv)
    targets = tuple(args.targets.split(","))
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(TARGETS)}")
    start = time.perf_counter()
    results = sweep(variants(args.quick), targets, args.jobs)
    print(table(results, args.full))
    found = problems(results)
    compiled = len({id(r) for r in results.values()})
    print(f"\n{len(results)} variant x target pairs, {compiled} distinct compiles, {len(found)} problems "
          f"({time.perf_counter() - start:.0f} s)")
    for p in found:
        print("PROBLEM", p)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
