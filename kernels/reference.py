"""Plain-PyTorch twin of the attention kernels: explicit masked softmax in fp32, one document at a time.

This is the ground truth for the kernel tests and the CPU building blocks of ring attention.
Shapes (packed THD):
    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D]; cu_seqlens_q / cu_seqlens_k: int32 [num_docs + 1], starting at 0;
    pos_q / pos_k: int32 [Tq] / [Tk] positions within each document (None: 0, 1, 2, ... per document).
Document i of q attends only document i of k; with ``causal`` a query sees a key iff pos_k <= pos_q.
Rows that see no key give out = 0 and lse = -inf (never NaN, zero gradients).
"""
from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def default_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """int32 [total]: each token's offset from the start of its document."""
    idx = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    cu = cu_seqlens.to(torch.int64)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    return (idx - cu[doc]).to(torch.int32)


def _resolve(q: Tensor, cu_q: Tensor, cu_k: Tensor, softmax_scale, pos_q, pos_k, tk: int):
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    pos_q = default_positions(cu_q, q.shape[0]) if pos_q is None else pos_q
    pos_k = default_positions(cu_k, tk) if pos_k is None else pos_k
    return scale, pos_q, pos_k


def _doc_bounds(cu_q: Tensor, cu_k: Tensor):
    """Host lists of (q_start, q_end, k_start, k_end) per document."""
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_q.numel() - 1} documents but cu_seqlens_k has {cu_k.numel() - 1}")
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _expand_kv(x: Tensor, group: int) -> Tensor:
    """[L, Hkv, D] -> [L, Hkv * group, D]: q head h reads kv head h // group."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _reduce_kv(x: Tensor, group: int) -> Tensor:
    """[L, Hkv * group, D] -> [L, Hkv, D]: sum the gradients of the q heads sharing a kv head."""
    return x if group == 1 else x.unflatten(1, (-1, group)).sum(2)


def _masked_scores(qd, kd, pq, pk, causal, scale, dtype=torch.float32) -> Tensor:
    """Scores [H, Lq, Lk] in ``dtype`` with -inf where the key is not visible."""
    s = torch.einsum("qhd,khd->hqk", qd.to(dtype), kd.to(dtype)) * scale
    if causal:
        s = s.masked_fill(pk[None, None, :] > pq[None, :, None], float("-inf"))
    return s


def _probs_lse(s: Tensor):
    """Safe softmax of [H, Lq, Lk]: rows without any visible key give p = 0 and lse = -inf."""
    # A -inf guard column keeps amax defined when Lk == 0.
    s = torch.cat([s, s.new_full(s.shape[:-1] + (1,), float("-inf"))], dim=-1)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return p[..., :-1], lse


def _doc_forward(qd, kd, vd, pq, pk, causal, scale, dtype):
    """One document: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D], lse [Lq, Hq] in ``dtype``."""
    group = qd.shape[1] // kd.shape[1]
    s = _masked_scores(qd, _expand_kv(kd, group), pq, pk, causal, scale, dtype)
    p, lse = _probs_lse(s)
    out = torch.einsum("hqk,khd->qhd", p, _expand_kv(vd, group).to(dtype))
    return out, lse.transpose(0, 1)


def _check(q, k, v):
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"expected q [Tq, Hq, D] and k, v [Tk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]} and head dims must match")


def _forward_math(q, k, v, cu_q, cu_k, causal, scale, pos_q, pos_k, dtype=torch.float32):
    """Differentiable forward computed in ``dtype``: (out [Tq, Hq, D], lse [Tq, Hq])."""
    outs, lses = [], []
    for qs, qe, ks, ke in _doc_bounds(cu_q, cu_k):
        o, l = _doc_forward(q[qs:qe], k[ks:ke], v[ks:ke], pos_q[qs:qe], pos_k[ks:ke], causal, scale, dtype)
        outs.append(o)
        lses.append(l)
    if not outs:
        return q.to(dtype) * 0, q.new_full(q.shape[:2], float("-inf"), dtype=dtype)
    return torch.cat(outs), torch.cat(lses)


def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                      softmax_scale=None, pos_q=None, pos_k=None, tables=None):
    """Block forward for ring attention: -> (out [Tq, Hq, D] in q.dtype, lse fp32 [Tq, Hq]). No autograd.

    ``tables`` (the Triton kernels' block tables) is accepted for a common signature and unused.
    """
    _check(q, k, v)
    scale, pos_q, pos_k = _resolve(q, cu_seqlens_q, cu_seqlens_k, softmax_scale, pos_q, pos_k, k.shape[0])
    with torch.no_grad():
        out, lse = _forward_math(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q, pos_k)
    return out.to(q.dtype), lse


def _doc_backward(dod, qd, kd, vd, od, lsed, pq, pk, causal, scale):
    """One document's gradients from the GIVEN out/lse; returns fp32 (dq, dk, dv)."""
    group = qd.shape[1] // kd.shape[1]
    k_rep, v_rep = _expand_kv(kd, group).float(), _expand_kv(vd, group).float()
    s = _masked_scores(qd, k_rep, pq, pk, causal, scale)
    lse = lsed.transpose(0, 1).unsqueeze(-1)  # [H, Lq, 1]
    # Rows with lse = -inf saw no key: their probabilities are 0, not exp(nan).
    p = torch.where(torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)
    do = dod.float()
    dv = torch.einsum("hqk,qhd->khd", p, do)
    dp = torch.einsum("qhd,khd->hqk", do, v_rep)
    delta = (do * od.float()).sum(-1).transpose(0, 1).unsqueeze(-1)  # [H, Lq, 1]
    ds = p * (dp - delta)
    dq = torch.einsum("hqk,khd->qhd", ds, k_rep) * scale
    dk = torch.einsum("hqk,qhd->khd", ds, qd.float()) * scale
    return dq, _reduce_kv(dk, group), _reduce_kv(dv, group)


def attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       causal=True, softmax_scale=None, pos_q=None, pos_k=None, tables=None):
    """Block backward for ring attention: -> (dq, dk, dv) in the dtypes of q, k, v.

    ``out``/``lse`` are used as given: in ring attention they are the globally merged results, so
    p = exp(s - lse) and delta = rowsum(dout * out) refer to the full softmax, not this block's.
    """
    _check(q, k, v)
    scale, pos_q, pos_k = _resolve(q, cu_seqlens_q, cu_seqlens_k, softmax_scale, pos_q, pos_k, k.shape[0])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    with torch.no_grad():
        for qs, qe, ks, ke in _doc_bounds(cu_seqlens_q, cu_seqlens_k):
            g = _doc_backward(dout[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe], lse[qs:qe],
                              pos_q[qs:qe], pos_k[ks:ke], causal, scale)
            dq[qs:qe], dk[ks:ke], dv[ks:ke] = g
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True,
              softmax_scale=None, pos_q=None, pos_k=None, backend="reference", return_lse=False,
              compute_dtype=torch.float32):
    """Reference attention, differentiable through q, k, v by plain autograd on the explicit math.

    Same signature and semantics as ``kernels.attention``; ``backend`` is accepted and ignored.
    ``compute_dtype`` (default fp32) is the dtype of the math: tests run it in fp16 to measure the
    rounding error that a half-precision kernel is allowed. Returns out [Tq, Hq, D] in q.dtype, or
    (out, lse fp32 [Tq, Hq]) with ``return_lse``; lse carries no gradient.
    """
    _check(q, k, v)
    scale, pos_q, pos_k = _resolve(q, cu_seqlens_q, cu_seqlens_k, softmax_scale, pos_q, pos_k, k.shape[0])
    out, lse = _forward_math(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q, pos_k, compute_dtype)
    out = out.to(q.dtype)
    return (out, lse.detach().float()) if return_lse else out
