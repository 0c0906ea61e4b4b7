"""Triton flash attention (FA2) over packed THD tensors, forward and backward.

Shapes: q [Tq, Hq, D]; k, v [Tk, Hkv, D]; cu_seqlens_q / cu_seqlens_k int32 [num_docs + 1]; pos_q /
pos_k int32 [Tq] / [Tk] or None (0, 1, 2, ... per document); out [Tq, Hq, D]; lse fp32 [Tq, Hq].
Document i of q attends document i of k; causal means pos_k <= pos_q. GQA: q head h reads kv head
h // (Hq // Hkv), K/V are never repeated. Rows that see no key: out 0, lse -inf, zero gradients.

Grids run over the blocks of each document only: an int32 table maps program id -> (document,
first token of the block), built on the device (loom.kernels.block_table: no host sync, a grid bound
from shapes, the programs past the last block exit at once) and shared by every launch over one
batch through a ``BlockTables``.
  forward  grid (q blocks, Hq):  online softmax over the k blocks of the same document.
  dq       grid (q blocks, Hq):  recomputes p from the GIVEN lse (no atomics, deterministic).
  dk / dv  grid (k blocks, Hkv): loops over the q heads of the GQA group and the document's q blocks.
The backward takes out/lse as given, so ring attention can pass the globally merged ones.
Run on CPU tensors with TRITON_INTERPRET=1 (set before this module is imported; it is read when
the kernels are decorated). The interpreter cannot compute in bf16: use fp32/fp16 there.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loom.kernels.block_table import BlockTables

INTERPRETED = bool(triton.knobs.runtime.interpret)
# triton.language's own @jit helpers (tl.max, tl.sum, tl.zeros) were decorated when triton itself was
# first imported; the interpreter can only call them if TRITON_INTERPRET=1 was already set then.
STDLIB_INTERPRETED = type(tl.max).__name__ == "InterpretedFunction"
LOG2E = 1.4426950408889634
FAR = tl.constexpr(1 << 30)  # position of out-of-range keys: never visible, never the block's minimum


@triton.jit
def _positions(POS, offs, start, end, HAS_POS: tl.constexpr, fill):
    """Positions of tokens offs (default: offset from the document start); `fill` outside [start, end)."""
    inside = offs < end
    if HAS_POS:
        pos = tl.load(POS + offs, mask=inside, other=fill)
    else:
        pos = tl.where(inside, offs - start, fill)
    return pos


@triton.jit
def _tile(PTR, rows, row_mask, stride_t, head, stride_h, offs_d, D):
    """Load a [rows, BLOCK_D] tile of a [T, H, D] tensor (zeros outside)."""
    ptrs = PTR + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_tile(PTR, x, rows, row_mask, stride_t, head, stride_h, offs_d, D):
    ptrs = PTR + rows.to(tl.int64)[:, None] * stride_t + head * stride_h + offs_d[None, :]
    tl.store(ptrs, x.to(PTR.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _visible(pq, pk, m_mask, n_mask, CAUSAL: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask: same document (both in range) and, if causal, pos_k <= pos_q."""
    vis = m_mask[:, None] & n_mask[None, :]
    if CAUSAL:
        vis = vis & (pk[None, :] <= pq[:, None])
    return vis


@triton.jit
def _overlaps(max_pq, min_pk, CAUSAL: tl.constexpr):
    """Whether a (q block, k block) pair can have any visible pair; always true when bidirectional."""
    if CAUSAL:
        ok = min_pk <= max_pq
    else:
        ok = min_pk == min_pk
    return ok


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, POS_Q, POS_K, CU_Q, CU_K, TABLE,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sl_t,
                scale_log2, D, GROUP,
                CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    hk = h // GROUP
    doc, q_lo = tl.load(TABLE + 2 * pid), tl.load(TABLE + 2 * pid + 1)
    if doc < 0:  # past the last block: the grid is a bound (loom.kernels.block_table)
        return
    q_doc, q_end = tl.load(CU_Q + doc), tl.load(CU_Q + doc + 1)
    k_doc, k_end = tl.load(CU_K + doc), tl.load(CU_K + doc + 1)
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    q = _tile(Q, offs_m, m_mask, sq_t, h, sq_h, offs_d, D)
    pq = _positions(POS_Q, offs_m, q_doc, q_end, HAS_POS, -1)
    max_pq = tl.max(pq, 0)
    k_hi = k_end
    if CAUSAL and not HAS_POS:  # default positions: keys past the block's last query are never seen
        k_hi = tl.minimum(k_end, k_doc + max_pq + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(k_doc, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_end
        pk = _positions(POS_K, offs_n, k_doc, k_end, HAS_POS, FAR)
        if _overlaps(max_pq, tl.min(pk, 0), CAUSAL):  # skip key blocks wholly in this block's future
            kt = tl.trans(_tile(K, offs_n, n_mask, sk_t, hk, sk_h, offs_d, D))
            s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
            s = tl.where(_visible(pq, pk, m_mask, n_mask, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(V, offs_n, n_mask, sv_t, hk, sv_h, offs_d, D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    _store_tile(O, acc / l_safe[:, None], offs_m, m_mask, so_t, h, so_h, offs_d, D)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln
    tl.store(LSE + offs_m.to(tl.int64) * sl_t + h, lse, mask=m_mask)


@triton.jit
def _row_stats(LSE, DELTA, offs_m, m_mask, sl_t, h):
    """lse in log2 units (+inf for rows that saw nothing, so that p = 0) and delta, both [BLOCK_M]."""
    lse = tl.load(LSE + offs_m.to(tl.int64) * sl_t + h, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m.to(tl.int64) * sl_t + h, mask=m_mask, other=0.0)
    return lse, delta


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, POS_Q, POS_K, CU_Q, CU_K, TABLE,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, sl_t,
               scale_log2, scale, D, GROUP,
               CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, h = tl.program_id(0), tl.program_id(1)
    hk = h // GROUP
    doc, q_lo = tl.load(TABLE + 2 * pid), tl.load(TABLE + 2 * pid + 1)
    if doc < 0:  # past the last block: the grid is a bound (loom.kernels.block_table)
        return
    q_doc, q_end = tl.load(CU_Q + doc), tl.load(CU_Q + doc + 1)
    k_doc, k_end = tl.load(CU_K + doc), tl.load(CU_K + doc + 1)
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_end
    q = _tile(Q, offs_m, m_mask, sq_t, h, sq_h, offs_d, D)
    do = _tile(DO, offs_m, m_mask, sdo_t, h, sdo_h, offs_d, D)
    lse, delta = _row_stats(LSE, DELTA, offs_m, m_mask, sl_t, h)
    pq = _positions(POS_Q, offs_m, q_doc, q_end, HAS_POS, -1)
    max_pq = tl.max(pq, 0)
    k_hi = k_end
    if CAUSAL and not HAS_POS:
        k_hi = tl.minimum(k_end, k_doc + max_pq + 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(k_doc, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_end
        pk = _positions(POS_K, offs_n, k_doc, k_end, HAS_POS, FAR)
        if _overlaps(max_pq, tl.min(pk, 0), CAUSAL):
            k = _tile(K, offs_n, n_mask, sk_t, hk, sk_h, offs_d, D)
            v = _tile(V, offs_n, n_mask, sv_t, hk, sv_h, offs_d, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.where(_visible(pq, pk, m_mask, n_mask, CAUSAL), tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    _store_tile(DQ, dq * scale, offs_m, m_mask, sdq_t, h, sdq_h, offs_d, D)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, POS_Q, POS_K, CU_Q, CU_K, TABLE,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h, sl_t,
                 scale_log2, scale, D, GROUP,
                 CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid, hk = tl.program_id(0), tl.program_id(1)
    doc, k_lo = tl.load(TABLE + 2 * pid), tl.load(TABLE + 2 * pid + 1)
    if doc < 0:
        return
    q_doc, q_end = tl.load(CU_Q + doc), tl.load(CU_Q + doc + 1)
    k_doc, k_end = tl.load(CU_K + doc), tl.load(CU_K + doc + 1)
    offs_n = k_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < k_end
    k = _tile(K, offs_n, n_mask, sk_t, hk, sk_h, offs_d, D)
    v = _tile(V, offs_n, n_mask, sv_t, hk, sv_h, offs_d, D)
    pk = _positions(POS_K, offs_n, k_doc, k_end, HAS_POS, FAR)
    min_pk = tl.min(pk, 0)
    q_start = q_doc
    if CAUSAL and not HAS_POS:  # default positions: queries before the block's first key see none of it
        q_start = q_doc + (k_lo - k_doc)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        for m0 in range(q_start, q_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < q_end
            pq = _positions(POS_Q, offs_m, q_doc, q_end, HAS_POS, -1)
            if _overlaps(tl.max(pq, 0), min_pk, CAUSAL):
                q = _tile(Q, offs_m, m_mask, sq_t, h, sq_h, offs_d, D)
                do = _tile(DO, offs_m, m_mask, sdo_t, h, sdo_h, offs_d, D)
                lse, delta = _row_stats(LSE, DELTA, offs_m, m_mask, sl_t, h)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
                p = tl.where(_visible(pq, pk, m_mask, n_mask, CAUSAL), tl.exp2(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    _store_tile(DK, dk * scale, offs_n, n_mask, sdk_t, hk, sdk_h, offs_d, D)
    _store_tile(DV, dv, offs_n, n_mask, sdv_t, hk, sdv_h, offs_d, D)


# ----------------------------------------------------------------------------------------------
# Host side

KERNELS = ("fwd", "dq", "dkdv")

# The interpreter pays per block op, not per element: 32 runs a 1023-token causal document 5x faster
# than 16, while documents of 113..239 tokens still span several blocks (tests need the boundaries).
INTERPRETER_BLOCKS = (32, 32)

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) of each kernel, by (dtype kind, BLOCK_D, head dim a multiple
# of 16). Chosen by compiling every variant ahead of time for sm_80, sm_86 and sm_90 (tools/kernel_report.py,
# checked by tests/kernels/test_compile_targets.py): tiles that keep every variant within sm_86's 99 KB
# of shared memory (sm_80 allows 163 KB, sm_90 227 KB) and free of register spills. fp32 dots run on
# FMA units (input_precision="ieee"), which hold the operand tiles in registers: hence small tiles, 8
# warps and, for dk/dv, no software pipelining (its prefetch of the next q tile costs the registers).
# A head dim that is no multiple of 16 (72: SigLIP) loads unvectorised, masked rows, which costs
# registers: its own entries where measured; other such dims take the aligned entry of their BLOCK_D.
# maxnreg 255 (the hardware's limit; x 256 threads it still fits an SM's register file): left to itself,
# ptxas caps these kernels at an occupancy step (64 or 168 registers) and spills 8-16 bytes to get there.
# Not everywhere: on other kernels the same option makes ptxas spill at 255 instead.
# Untimed on hardware: these settle resources, not speed.
GPU_BLOCKS = {
    ("half", 16, True): {"fwd": (64, 32, 4, 2), "dq": (64, 64, 4, 2, 255), "dkdv": (64, 64, 8, 2)},
    ("half", 32, True): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 64, 4, 2)},
    ("half", 64, True): {"fwd": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (32, 32, 8, 2)},
    ("half", 128, True): {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2)},
    ("half", 128, False): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "dkdv": (32, 16, 8, 2)},
    ("half", 256, True): {"fwd": (64, 32, 8, 2), "dq": (32, 32, 8, 2, 255), "dkdv": (16, 32, 8, 2)},
    ("fp32", 16, True): {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 1), "dkdv": (16, 16, 4, 1)},
    ("fp32", 32, True): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 8, 2), "dkdv": (32, 16, 4, 1)},
    ("fp32", 64, True): {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (16, 32, 8, 1)},
    ("fp32", 128, True): {"fwd": (16, 32, 8, 2), "dq": (16, 16, 8, 2), "dkdv": (16, 16, 8, 1, 255)},
    ("fp32", 128, False): {"fwd": (16, 16, 8, 2), "dq": (16, 16, 8, 2), "dkdv": (16, 16, 4, 1, 255)},
    ("fp32", 256, True): {"fwd": (32, 16, 8, 2), "dq": (16, 16, 8, 1), "dkdv": (16, 16, 8, 1)},
}


def _config(device: torch.device, head_dim: int, dtype: torch.dtype, kernel: str) -> dict:
    """Block sizes and launch options of ``kernel`` (BLOCK_D = head dim padded to a power of two, masked)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":
        return dict(BLOCK_M=INTERPRETER_BLOCKS[0], BLOCK_N=INTERPRETER_BLOCKS[1], BLOCK_D=block_d)
    if block_d > 256:
        raise ValueError(f"the triton attention kernels take head dims up to 256, got {head_dim}")
    kind = "fp32" if dtype == torch.float32 else "half"
    table = GPU_BLOCKS.get((kind, block_d, head_dim % 16 == 0)) or GPU_BLOCKS[(kind, block_d, True)]
    block_m, block_n, warps, stages, *regs = table[kernel]
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return dict(cfg, maxnreg=regs[0]) if regs else cfg


def _meta(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool, has_pos: bool) -> dict:
    """The constexprs and launch options of one launch (what the JIT specialises on besides the arguments)."""
    # fp32 inputs mean "exact": keep tl.dot off TF32 (10-bit mantissa) on tensor-core GPUs.
    return dict(CAUSAL=bool(causal), HAS_POS=bool(has_pos), PRECISION="ieee" if dtype == torch.float32 else None,
                **_config(device, head_dim, dtype, kernel))


def _fwd_args(q, k, v, out, lse, pos_q, pos_k, cu_q, cu_k, scale, table):
    return (q, k, v, out, lse, pos_q, pos_k, cu_q, cu_k, table,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), scale * LOG2E, q.shape[2], q.shape[1] // k.shape[1])


def _dq_args(q, k, v, dout, dq, lse, delta, pos_q, pos_k, cu_q, cu_k, scale, table):
    return (q, k, v, dout, dq, lse, delta, pos_q, pos_k, cu_q, cu_k, table,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            scale * LOG2E, scale, q.shape[2], q.shape[1] // k.shape[1])


def _dkdv_args(q, k, v, dout, dk, dv, lse, delta, pos_q, pos_k, cu_q, cu_k, scale, table):
    return (q, k, v, dout, dk, dv, lse, delta, pos_q, pos_k, cu_q, cu_k, table,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            lse.stride(0), scale * LOG2E, scale, q.shape[2], q.shape[1] // k.shape[1])


LAUNCHES = {"fwd": (_fwd_kernel, _fwd_args), "dq": (_dq_kernel, _dq_args), "dkdv": (_dkdv_kernel, _dkdv_args)}


def _check_runnable(x: torch.Tensor):
    if x.device.type != "cuda" and not (INTERPRETED and STDLIB_INTERPRETED):
        raise RuntimeError("the triton attention backend needs CUDA tensors, or (CPU, for tests) "
                           "TRITON_INTERPRET=1 set before triton is first imported in this process")
    if x.device.type != "cuda" and x.dtype == torch.bfloat16:
        raise RuntimeError("the Triton interpreter cannot compute in bf16; use fp32 or fp16 on CPU")


def _prepare(q, k, v, cu_q, cu_k, causal, softmax_scale, pos_q, pos_k):
    """Common launch arguments: contiguous last dims, int32 cu_seqlens, positions, scale."""
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2] or k.shape != v.shape:
        raise ValueError(f"bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_runnable(q)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu_q, cu_k = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
    has_pos = causal and (pos_q is not None or pos_k is not None)  # bidirectional ignores positions
    if has_pos:
        from loom.kernels.reference import default_positions
        pos_q = default_positions(cu_q, q.shape[0]) if pos_q is None else pos_q.to(torch.int32).contiguous()
        pos_k = default_positions(cu_k, k.shape[0]) if pos_k is None else pos_k.to(torch.int32).contiguous()
    else:
        pos_q = pos_k = cu_q  # never read; any pointer will do
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return q, k, v, cu_q, cu_k, pos_q, pos_k, scale, has_pos


def _launch(kernel, tables, cu, total, heads, q, causal, has_pos, *args):
    """Run ``kernel`` over the blocks of ``cu``'s documents (``total`` tokens) times ``heads``;
    ``args``: its ``LAUNCHES`` packer's arguments but the table."""
    meta = _meta(kernel, q.device, q.dtype, q.shape[-1], causal, has_pos)
    block = meta["BLOCK_N"] if kernel == "dkdv" else meta["BLOCK_M"]
    table, n = tables.get(cu, block, total)
    if n and heads:
        fn, pack = LAUNCHES[kernel]
        fn[(n, heads)](*pack(*args, table), **meta)


def flash_attn_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                       softmax_scale=None, pos_q=None, pos_k=None, tables=None):
    """Block forward: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> (out [Tq, Hq, D] in q.dtype, lse fp32 [Tq, Hq]).

    No autograd. ``max_seqlen_*`` are accepted for API symmetry; the block table makes them unneeded.
    ``tables``: a BlockTables shared by the launches over this batch (None: built for this call).
    """
    tables = BlockTables() if tables is None else tables
    q, k, v, cu_q, cu_k, pos_q, pos_k, scale, has_pos = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, causal,
                                                               softmax_scale, pos_q, pos_k)
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    _launch("fwd", tables, cu_seqlens_q, q.shape[0], q.shape[1], q, causal, has_pos,
            q, k, v, out, lse, pos_q, pos_k, cu_q, cu_k, scale)
    return out, lse


def flash_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        causal=True, softmax_scale=None, pos_q=None, pos_k=None, tables=None):
    """Block backward from the GIVEN out/lse (globally merged ones under ring attention).

    dout, out: [Tq, Hq, D]; lse fp32 [Tq, Hq] -> (dq, dk, dv) in the dtypes of q, k, v.
    """
    tables = BlockTables() if tables is None else tables
    q, k, v, cu_q, cu_k, pos_q, pos_k, scale, has_pos = _prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, causal,
                                                               softmax_scale, pos_q, pos_k)
    dout = dout.to(q.dtype)  # the dots pair dout with q/v tiles, which must share a dtype
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    lse = lse.to(torch.float32).contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # [Tq, Hq]: rowsum(dO * O), FA2's preprocess
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    _launch("dq", tables, cu_seqlens_q, q.shape[0], q.shape[1], q, causal, has_pos,
            q, k, v, dout, dq, lse, delta, pos_q, pos_k, cu_q, cu_k, scale)
    _launch("dkdv", tables, cu_seqlens_k, k.shape[0], k.shape[1], q, causal, has_pos,
            q, k, v, dout, dk, dv, lse, delta, pos_q, pos_k, cu_q, cu_k, scale)
    return dq, dk, dv


class _FlashAttnFunction(torch.autograd.Function):
    """Autograd wrapper: differentiable through q, k, v; lse is returned non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_q, pos_k, tables):
        tables = BlockTables() if tables is None else tables  # the backward reuses the forward's
        out, lse = flash_attn_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_q, pos_k, tables)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, pos_q, pos_k)
        ctx.args = (max_q, max_k, causal, scale, tables)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, pos_q, pos_k = ctx.saved_tensors
        max_q, max_k, causal, scale, tables = ctx.args
        dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                                         pos_q, pos_k, tables)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def flash_attn_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True,
                    softmax_scale=None, pos_q=None, pos_k=None, tables=None):
    """Differentiable varlen attention: -> (out [Tq, Hq, D], lse fp32 [Tq, Hq], no gradient)."""
    return _FlashAttnFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                    softmax_scale, pos_q, pos_k, tables)
