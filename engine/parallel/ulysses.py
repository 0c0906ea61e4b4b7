"""Ulysses (DeepSpeed) context parallelism: trade the sequence split for a head split.

An all-to-all (``comm.SeqToHeads``) turns this rank's tokens with all (TP-local) heads into all
tokens with ``1/cp`` of the heads; attention then runs locally over the whole microbatch with its
original ``cu_seqlens``; a second all-to-all (``comm.HeadsToSeq``) turns the output back. The
gathered tokens arrive zigzag-ordered (rank 0's shard, then rank 1's, ...), so they are permuted
into document order first and back afterwards.

Communication per layer and rank (bytes leaving the rank): each all-to-all sends ``(cp-1)/cp`` of
its input, so forward sends ``(cp-1)/cp * (q + k + v + out)`` bytes of the local shard, and backward
the same again (dout, dq, dk, dv). K/V heads are replicated first when ``cp`` does not divide them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from loom import kernels
from loom.parallel import comm
from loom.parallel.cp_plan import CommStats, ZigzagPlan


def kv_replication(num_kv_heads: int, cp: int) -> int:
    """How many times to repeat each K/V head so that ``cp`` divides them and every q head group
    still reads its own K/V head (``cp // gcd``: an lcm of Hkv and cp, which divides Hq)."""
    return cp // math.gcd(num_kv_heads, cp)


def check_heads(num_heads: int, num_kv_heads: int, cp: int) -> None:
    if num_heads % cp:
        raise ValueError(f"Ulysses needs the {num_heads} local q heads to be divisible by cp={cp}")
    if num_heads % (num_kv_heads * kv_replication(num_kv_heads, cp)):  # unreachable for valid GQA
        raise ValueError(f"Ulysses cannot split {num_kv_heads} kv heads for {num_heads} q heads over cp={cp}")


def ulysses_attention(q, k, v, plan: ZigzagPlan, group, *, causal: bool = True, backend: str = "auto",
                      softmax_scale: Optional[float] = None, stats: Optional[CommStats] = None) -> torch.Tensor:
    """q ``[T/cp, Hq, D]``, k/v ``[T/cp, Hkv, D]`` (zigzag shard) -> ``[T/cp, Hq, D]``. Collective over ``group``."""
    n = comm.group_size(group)
    check_heads(q.shape[1], k.shape[1], n)
    rep = kv_replication(k.shape[1], n)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    order, inverse = plan.gathered_index()
    q, k, v = (comm.seq_to_heads(x, group, stats).index_select(0, inverse) for x in (q, k, v))
    cu = plan.cu_seqlens_full
    out = kernels.attention(q, k, v, cu, cu, plan.max_seqlen_full, plan.max_seqlen_full, causal=causal,
                            softmax_scale=softmax_scale, backend=backend, tables=plan.tables)
    return comm.heads_to_seq(out.index_select(0, order), group, stats)
