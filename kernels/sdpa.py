"""The ``torch`` backend: packed varlen attention through ``F.scaled_dot_product_attention``.

This is what trains models on CPU, so it batches documents into as few SDPA calls as the
padding cost allows:
  * a long document (>= SOLO_LEN tokens) gets its own call on views of q/k/v (no copies);
  * short documents are sorted by length and packed into padded buckets, one call per bucket.
Masks are avoided where the geometry allows: with default positions and causal, SDPA's
``is_causal`` (top-left aligned, like our true-position rule) never lets a real query see a padded
key as long as each document has Lq <= Lk. Otherwise a boolean mask is built from the true
positions. Rows that see no key come out as 0 (SDPA's own behaviour since torch 2.5, which a test
pins). Autograd flows through SDPA; lse is not produced here (the dispatcher uses the reference).

Under ``torch.compile`` the bucketing reads ``cu_seqlens`` on the host, so traced it would bake one
document layout into the graph and recompile for the next: ``_varlen`` stays out of the graph (a
graph break). A caller that knows every document has ``max_seqlen`` tokens says so (``uniform_len``)
and gets one SDPA call on views, decided from Python ints alone, which compiles into the graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOLO_LEN = 128  # documents at least this long are worth an SDPA call of their own
BUCKET_GROWTH = 1.5  # a bucket's longest doc is at most this times its shortest (bounds padding waste)


def _buckets(lq: list[int], lk: list[int]) -> list[list[int]]:
    """Group document ids (skipping empty ones) into SDPA calls; returns lists of doc ids."""
    sizes = {i: max(lq[i], lk[i]) for i in range(len(lq)) if lq[i] > 0 and lk[i] > 0}
    buckets, cur, first = [], [], 0
    for i in sorted(sizes, key=sizes.get):
        if sizes[i] >= SOLO_LEN:
            buckets.append([i])
            continue
        if cur and sizes[i] > BUCKET_GROWTH * max(first, 16):
            buckets.append(cur)
            cur = []
        if not cur:
            first = sizes[i]
        cur.append(i)
    if cur:
        buckets.append(cur)
    return buckets


def _sdpa(q4, k4, v4, mask, is_causal, scale):
    """[B, Hq, Lq, D] x [B, Hkv, Lk, D] -> [B, Hq, Lq, D]; GQA without copying K/V."""
    gqa = q4.shape[1] != k4.shape[1]
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)


def _solo(q, k, v, qs, qe, ks, ke, causal, scale, pos_q, pos_k):
    """One document through views: -> rows [Lq, Hq, D]."""
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q[qs:qe], k[ks:ke], v[ks:ke]))
    if causal and pos_q is not None:
        mask = pos_q[qs:qe, None] >= pos_k[None, ks:ke]
        return _sdpa(q4, k4, v4, mask, False, scale)[0].transpose(0, 1)
    # Default positions: SDPA's top-left causal mask is exactly pos_k <= pos_q, also when Lq != Lk.
    return _sdpa(q4, k4, v4, None, causal, scale)[0].transpose(0, 1)


def _gather_index(starts, lens, width, device):
    """[B, width] token indices (padding points at the doc's first token) and a [B, width] validity mask."""
    ar = torch.arange(width, device=device)
    starts = torch.tensor(starts, device=device)[:, None]
    lens_t = torch.tensor(lens, device=device)[:, None]
    valid = ar[None, :] < lens_t
    return torch.where(valid, starts + ar, starts), valid


def _bucket(q, k, v, cq, ck, ids, causal, scale, pos_q, pos_k):
    """Several short documents padded into one SDPA call: -> (q token indices [n], rows [n, Hq, D])."""
    dev = q.device
    lq = [cq[i + 1] - cq[i] for i in ids]
    lk = [ck[i + 1] - ck[i] for i in ids]
    iq, vq = _gather_index([cq[i] for i in ids], lq, max(lq), dev)
    ik, vk = _gather_index([ck[i] for i in ids], lk, max(lk), dev)
    q4 = q[iq].transpose(1, 2)  # [B, Hq, Lq, D]
    k4, v4 = k[ik].transpose(1, 2), v[ik].transpose(1, 2)
    mask, is_causal = None, False
    if causal and pos_q is None and all(a <= b for a, b in zip(lq, lk)):
        is_causal = True
    else:
        mask = vk[:, None, None, :]  # [B, 1, 1, Lk]
        if causal:
            pq = iq - iq[:, :1] if pos_q is None else pos_q[iq]
            pk = ik - ik[:, :1] if pos_k is None else pos_k[ik]
            mask = mask & (pk[:, None, None, :] <= pq[:, None, :, None])
        if min(lk) == max(lk) and not causal:
            mask = None  # every key is real
    out = _sdpa(q4, k4, v4, mask, is_causal, scale).transpose(1, 2)  # [B, Lq, Hq, D]
    return iq[vq], out[vq]


def sdpa_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q=None, pos_k=None, uniform_len=None):
    """Packed attention: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> out [Tq, Hq, D] in q.dtype.

    ``pos_q``/``pos_k`` None means default positions. ``uniform_len``: every document, on both sides,
    has this many tokens (the caller's promise; None: read the layout from ``cu_seqlens``).
    Differentiable through q, k, v.
    """
    n = cu_seqlens_q.numel() - 1
    if uniform_len is not None and (pos_q is None and pos_k is None or not causal) \
            and q.shape[0] == k.shape[0] == n * uniform_len:
        return _uniform(q, k, v, n, uniform_len, causal, scale)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q, pos_k)


@torch.compiler.disable
def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q, pos_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lq = [cq[i + 1] - cq[i] for i in range(len(cq) - 1)]
    lk = [ck[i + 1] - ck[i] for i in range(len(ck) - 1)]
    if causal and (pos_q is not None or pos_k is not None):  # compare true positions on both sides
        from loom.kernels.reference import default_positions
        pos_q = default_positions(cu_seqlens_q, q.shape[0]) if pos_q is None else pos_q
        pos_k = default_positions(cu_seqlens_k, k.shape[0]) if pos_k is None else pos_k
    else:
        pos_q = pos_k = None  # bidirectional attention ignores positions
    if pos_q is None and cq == ck and len(set(lq)) == 1 and lq[0] > 0:
        return _uniform(q, k, v, len(lq), lq[0], causal, scale)
    pieces = []  # (doc ids, q token indices, rows [n, Hq, D])
    for ids in _buckets(lq, lk):
        if len(ids) == 1:
            i = ids[0]
            rows = _solo(q, k, v, cq[i], cq[i + 1], ck[i], ck[i + 1], causal, scale, pos_q, pos_k)
            pieces.append((ids, None, rows))
        else:
            pieces.append((ids, *_bucket(q, k, v, cq, ck, ids, causal, scale, pos_q, pos_k)))
    return _assemble(q, k, v, cq, lq, pieces)


def _uniform(q, k, v, n, length, causal, scale):
    """``n`` documents of one length (plain [B, S] batches): one SDPA call on views, as a batched model makes."""
    q4, k4, v4 = (x.view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = _sdpa(q4, k4, v4, None, causal, scale)  # [n, Hq, L, D]
    return out.transpose(1, 2).reshape(q.shape)


def _assemble(q, k, v, cq, lq, pieces):
    """Put the rows of every call back in token order; rows of documents without keys are 0."""
    tq, hq, d = q.shape
    pieces = sorted(pieces, key=lambda p: p[0][0])
    covered = sum(lq[i] for p in pieces for i in p[0])
    if pieces and covered == tq and all(p[1] is None for p in pieces):
        out = torch.cat([p[2] for p in pieces])  # solo documents, in order, covering every token
    else:
        out = q.new_zeros(tq, hq, d)
        if pieces:
            idx = torch.cat([torch.arange(cq[p[0][0]], cq[p[0][0] + 1], device=q.device) if p[1] is None
                             else p[1] for p in pieces])
            out = out.index_copy(0, idx, torch.cat([p[2] for p in pieces]))
    if torch.is_grad_enabled() and not out.requires_grad and any(x.requires_grad for x in (q, k, v)):
        # No document saw a key: keep the graph so that q, k, v get zero gradients, not None.
        out = out + (q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum())
    return out
