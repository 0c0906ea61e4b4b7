"""Context parallelism: this rank's share of a packed microbatch, and the attention that spans it.

Each of the ``cp`` ranks keeps its zigzag shard (``cp_plan.ZigzagPlan``) of every document.
Labels are computed per token before sharding (a token's label is the next token of its document),
so a chunk's last token keeps its true label even though that next token lives on another rank.
Attention over the CP group is ring attention (ring_attention.py) or Ulysses (ulysses.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from loom import kernels
from loom.model.batch import AttnContext, PackedBatch
from loom.model.surface import Surface
from loom.parallel import comm
from loom.parallel.cp_plan import CommStats, ZigzagPlan
from loom.parallel.ring_attention import ring_attention
from loom.parallel.ulysses import ulysses_attention

CP_MODES = ("ring", "ulysses")


@dataclass(kw_only=True)
class CPShard(AttnContext):
    """The attention context of a CP microbatch: the plan and this rank's place in it.

    ``positions`` (this rank's true positions, which the kernels mask with) follow from them.
    """

    plan: ZigzagPlan
    rank: int

    def __post_init__(self):
        if self.positions is None:
            self.positions = self.plan.positions(self.rank)


def shard_microbatch(mb, cp: int, rank: int) -> tuple[PackedBatch, torch.Tensor]:
    """This CP rank's share of a ``Microbatch``: (its PackedBatch, its labels).

    Labels are sharded like the tokens, so each keeps the next token of its document as target.
    """
    plan = ZigzagPlan(mb.cu_seqlens, cp, device=mb.input_ids.device)
    batch = PackedBatch(input_ids=plan.shard(mb.input_ids, rank), positions=plan.shard(mb.positions, rank),
                        cu_seqlens=plan.cu_seqlens(rank), max_seqlen=plan.max_seqlen(rank),
                        attn=CPShard(plan=plan, rank=rank))
    return batch, plan.shard(mb.labels, rank)


class ContextParallelAttention(nn.Module):
    """Drop-in for ``CoreAttention`` under CP: ring or Ulysses attention over the CP group.

    q: ``[T/cp, Hq, D]``, k/v: ``[T/cp, Hkv, D]`` (this rank's zigzag shard, TP-local heads)
    -> ``[T/cp, Hq, D]``. ``meta.attn`` must be the microbatch's ``CPShard``.
    """

    def __init__(self, backend: str, causal: bool, group, mode: str = "ring", stats: Optional[CommStats] = None):
        super().__init__()
        if mode not in CP_MODES:
            raise ValueError(f"cp mode {mode!r} is not one of {', '.join(CP_MODES)}")
        self.backend, self.causal, self.group, self.mode = backend, causal, group, mode
        self.stats = stats if stats is not None else CommStats()

    def surface(self) -> Surface:
        return Surface(recompute=("forward",))  # as the CoreAttention it replaces

    # Eager under train.compile: the shard plan drives host-side loops over ring steps and blocks,
    # and the exchanges are collectives (see comm.py).
    @torch.compiler.disable
    def forward(self, q, k, v, meta) -> torch.Tensor:
        shard = meta.attn
        if not isinstance(shard, CPShard):
            raise TypeError("context-parallel attention needs the microbatch's CPShard as PackedBatch.attn "
                            "(see loom.parallel.context_parallel.shard_microbatch)")
        if shard.plan.cp != comm.group_size(self.group) or shard.rank != comm.group_rank(self.group):
            raise ValueError(f"CPShard is for rank {shard.rank} of {shard.plan.cp}, but this is rank "
                             f"{comm.group_rank(self.group)} of a CP group of {comm.group_size(self.group)}")
        if self.mode == "ring":
            ops = kernels.block_ops(self.backend, q.device)
            return ring_attention(q, k, v, shard.plan.blocks(shard.rank, self.causal), self.group, ops,
                                  stats=self.stats)
        return ulysses_attention(q, k, v, shard.plan, self.group, causal=self.causal, backend=self.backend,
                                 stats=self.stats)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, backend={self.backend}, causal={self.causal}"
