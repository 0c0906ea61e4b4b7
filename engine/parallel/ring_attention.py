"""Ring attention over a context-parallel group (zigzag-sharded packed documents).

Each rank keeps its queries; K and V travel around the ring (rank ``r`` sends to ``r+1``, receives
from ``r-1``), so at step ``i`` rank ``r`` attends to the block of rank ``(r - i) % cp``. Each step
calls the per-block kernel with the true positions of both sides (from the ``ZigzagPlan``), and the
partial results merge in fp32 through their log-sum-exp. The transfer of the next block overlaps
the current block's compute. Backward recomputes every block from the merged out/lse, and the dK/dV
of a block travel with it (fp32) until they are home.

Communication per layer and rank, with ``KV`` the bytes of the local k plus v:
forward ``(cp-1) * KV``; backward ``(cp-1) * KV`` plus ``cp`` fp32 dK/dV hops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from loom.parallel import comm
from loom.parallel.cp_plan import BlockSpec, CommStats

TAG_KV, TAG_DKV = 17, 18  # gloo matches messages by (peer, tag): the K/V and dK/dV streams overlap


class RingComm:
    """Asynchronous send to the next rank of the ring and receive from the previous one.

    Per transfer: ``buf = ring.send_recv(x)``, ``ring.commit()``, compute, ``ring.wait()``; only then
    does ``buf`` hold the previous rank's tensor. Misuse (queueing while a transfer is in flight,
    committing nothing, waiting without a commit) raises instead of deadlocking or corrupting data.
    """

    def __init__(self, group, tag: int = 0, stats: Optional[CommStats] = None, kind: str = "ring"):
        self.group, self.tag, self.stats, self.kind = group, tag, stats, kind
        size, rank = comm.group_size(group), comm.group_rank(group)
        self.next, self.prev = (rank + 1) % size, (rank - 1) % size
        self._ops: list = []
        self._inflight: Optional[tuple] = None  # (works, tensors kept alive until wait)

    def send_recv(self, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._inflight is not None:
            raise RuntimeError("RingComm.send_recv() while a transfer is in flight: wait() first")
        x = x.contiguous()
        out = torch.empty_like(x) if out is None else out
        self._ops.append(dist.P2POp(dist.isend, x, group=self.group, tag=self.tag, group_peer=self.next))
        self._ops.append(dist.P2POp(dist.irecv, out, group=self.group, tag=self.tag, group_peer=self.prev))
        if self.stats is not None:
            self.stats.add(self.kind, x.numel() * x.element_size())
        return out

    def commit(self) -> None:
        if self._inflight is not None:
            raise RuntimeError("RingComm.commit() while a transfer is in flight: wait() first")
        if not self._ops:
            raise RuntimeError("RingComm.commit() with nothing queued: call send_recv() first")
        works = dist.batch_isend_irecv(self._ops)
        self._inflight = (works, [op.tensor for op in self._ops])
        self._ops = []

    def wait(self) -> None:
        if self._inflight is None:
            raise RuntimeError("RingComm.wait() without a committed transfer: call commit() first")
        for work in self._inflight[0]:
            work.wait()
        self._inflight = None


def merge_block(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Combine two partial softmax results of the same rows, in fp32.

    out ``[n, H, D]`` fp32, lse ``[n, H]`` fp32 (-inf: the row saw nothing yet) -> (out, lse).
    ``out - sigmoid(block_lse - lse) * (out - block_out)`` is the lse-weighted mean without ever
    exponentiating a large number; rows where both sides are -inf would give NaN and stay as they are.
    """
    block_out, block_lse = block_out.float(), block_lse.float()
    empty = torch.isneginf(lse) & torch.isneginf(block_lse)
    weight = torch.sigmoid(torch.where(empty, float("-inf"), block_lse - lse)).unsqueeze(-1)
    out = out - weight * (out - block_out)
    lse = torch.where(empty, lse, torch.logaddexp(lse, block_lse))
    return out, lse


def _rows(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    return x if index is None else x.index_select(0, index)


def _block_forward(ops, q, kv, blk: BlockSpec, scale: float):
    qb, kb, vb = _rows(q, blk.q_index), _rows(kv[0], blk.k_index), _rows(kv[1], blk.k_index)
    return ops.forward(qb, kb, vb, blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, blk.causal, scale,
                       blk.pos_q, blk.pos_k, tables=blk.tables)


def _merge_into(out, lse, block_out, block_lse, index) -> None:
    if index is None:
        new_out, new_lse = merge_block(out, lse, block_out, block_lse)
        out.copy_(new_out)
        lse.copy_(new_lse)
        return
    new_out, new_lse = merge_block(out[index], lse[index], block_out, block_lse)
    out.index_copy_(0, index, new_out)
    lse.index_copy_(0, index, new_lse)


def _block_backward(ops, dout, q, kv, out, lse, blk: BlockSpec, scale: float):
    """Gradients of one block from the merged out/lse: (dq rows, dk rows, dv rows), in input dtypes."""
    qi, ki = blk.q_index, blk.k_index
    return ops.backward(_rows(dout, qi), _rows(q, qi), _rows(kv[0], ki), _rows(kv[1], ki), _rows(out, qi),
                        _rows(lse, qi), blk.cu_q, blk.cu_k, blk.max_q, blk.max_k, blk.causal, scale,
                        blk.pos_q, blk.pos_k, tables=blk.tables)


def _add_rows(acc: torch.Tensor, index: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if index is None:
        acc.add_(x.float())
    else:
        acc.index_add_(0, index, x.float())


def _ring_forward(q, k, v, blocks, group, ops, scale, stats):
    """-> (out fp32 [T/cp, Hq, D], lse fp32 [T/cp, Hq]) merged over every visible block."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    ring = RingComm(group, TAG_KV, stats, "ring_fwd")
    kv = torch.stack([k, v])  # one message per step
    for step in range(size):
        if step + 1 < size:
            incoming = ring.send_recv(kv)
            ring.commit()
        blk = blocks[(rank - step) % size]
        if blk.visible:
            block_out, block_lse = _block_forward(ops, q, kv, blk, scale)
            _merge_into(out, lse, block_out, block_lse, blk.q_index)
        if step + 1 < size:
            ring.wait()
            kv = incoming
    return out, lse


def _ring_backward(dout, q, k, v, out, lse, blocks, group, ops, scale, stats):
    """-> (dq, dk, dv) of the local shard; dK/dV accumulate in fp32 as they travel."""
    size, rank = comm.group_size(group), comm.group_rank(group)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv_ring = RingComm(group, TAG_KV, stats, "ring_bwd_kv")
    dkv_ring = RingComm(group, TAG_DKV, stats, "ring_bwd_dkv")
    kv, dkv = torch.stack([k, v]), None
    for step in range(size):
        if step + 1 < size:
            incoming = kv_ring.send_recv(kv)
            kv_ring.commit()
        blk = blocks[(rank - step) % size]
        grads = _block_backward(ops, dout, q, kv, out, lse, blk, scale) if blk.visible else None
        if step == 0:
            acc = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        else:  # the block's dK/dV so far, from the ranks it visited before this one
            dkv_ring.wait()
            acc = dkv
        if grads is not None:
            _add_rows(dq, blk.q_index, grads[0])
            _add_rows(acc[0], blk.k_index, grads[1])
            _add_rows(acc[1], blk.k_index, grads[2])
        if size == 1:
            dkv = acc
            break
        dkv = dkv_ring.send_recv(acc)
        dkv_ring.commit()
        if step + 1 < size:
            kv_ring.wait()
            kv = incoming
    if size > 1:
        dkv_ring.wait()  # the last hop brings this rank's own block home, complete
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    """Causal or bidirectional attention over a CP group, K/V passed around the ring.

    forward: q ``[T/cp, Hq, D]``, k/v ``[T/cp, Hkv, D]`` (this rank's zigzag shard; same T/cp on every
    rank) -> out ``[T/cp, Hq, D]``; ``cp-1`` K/V transfers, merged in fp32 through the lse.
    backward: recompute each block from the merged out/lse; dq stays, dK/dV follow their block round
    the ring (fp32) back to its owner -> dq, dk, dv of the local shard.
    ``blocks[s]``: this rank's BlockSpec against rank ``s``'s K/V; blocks with nothing visible are
    skipped in both directions (their K/V still pass through, the ring must keep moving).
    """

    @staticmethod
    def forward(ctx, q, k, v, blocks, group, ops, scale, stats):
        # The kernels pick their own precision and the merge is explicitly fp32: keep autocast out.
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _ring_forward(q, k, v, blocks, group, ops, scale, stats)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (blocks, group, ops, scale, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, blocks, group, ops, *, softmax_scale: Optional[float] = None,
                   stats: Optional[CommStats] = None) -> torch.Tensor:
    """See RingAttention. ``ops``: ``kernels.block_ops(backend, device)``; ``blocks``:
    ``ZigzagPlan.blocks(rank, causal)``."""
    if len(blocks) != comm.group_size(group):
        raise ValueError(f"ring attention got {len(blocks)} blocks for a CP group of {comm.group_size(group)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return RingAttention.apply(q, k, v, blocks, group, ops, scale, stats)
