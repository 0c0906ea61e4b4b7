"""The context-parallel plan: zigzag sharding of packed microbatches, the ring blocks it implies,
and the byte counter of the CP collectives. context_parallel, ring_attention and ulysses all read
these, so this module imports none of them.

A microbatch is packed (THD): ``T`` tokens, documents delimited by ``cu_seqlens``. Under CP each of
the ``cp`` ranks keeps ``T/cp`` tokens. Every document is cut into ``2*cp`` chunks whose sizes differ
by at most one, and rank ``r`` keeps chunks ``r`` and ``2*cp-1-r`` of *every* document (zigzag), so
causal work is balanced whatever the document lengths. No document is padded: the ``len % (2*cp)``
extra tokens of each document go to the chunk slots ``p, p+1, ...`` (mod ``2*cp``) of a pointer ``p``
that keeps cycling across documents. When ``2*cp`` divides ``T`` each slot, hence each rank, ends up
with exactly ``T/(2*cp)`` tokens (equal ring buffers, and SP can split them further), even when
most documents are shorter than ``2*cp``.

``ZigzagPlan`` is a pure function of ``cu_seqlens`` and ``cp``: every rank computes the same one,
and knows from it every other rank's token positions, which is what ring attention needs to mask
K/V blocks received from peers and to skip, on the host, blocks in which nothing is visible.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from loom.config import check_zigzag_length
from loom.parallel import comm
from loom.parallel.index import ranges
from loom.kernels import BlockTables


@dataclass
class CommStats:
    """Bytes this rank sent over the CP group, by kind (``ring_fwd``, ``ring_bwd_kv``, ...).

    Only bytes that leave the rank count: the share of an all-to-all that a rank keeps is not sent.
    Passed explicitly to the collectives that count (``ring_attention.RingComm``, ``comm.SeqToHeads``,
    ``comm.HeadsToSeq``); ``ContextParallelAttention.stats`` holds one.
    """

    bytes: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)

    def reset(self) -> None:
        self.bytes.clear()

    def total(self) -> int:
        return sum(self.bytes.values())


def _cumsum0(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def zigzag_chunk_sizes(doc_lens: np.ndarray, cp: int) -> np.ndarray:
    """int64 ``[num_docs, 2*cp]``: the size of each chunk slot of each document.

    Sizes within a document differ by at most one; extras go to slots from a pointer that cycles
    across documents, so the column sums are equal whenever ``2*cp`` divides the total.
    """
    n = 2 * cp
    doc_lens = np.asarray(doc_lens, np.int64)
    base, rem = np.divmod(doc_lens, n)
    pointer = (np.cumsum(rem) - rem) % n
    slot = np.arange(n)
    extra = (slot[None, :] - pointer[:, None]) % n < rem[:, None]
    return base[:, None] + extra


@dataclass
class BlockSpec:
    """What q-rank ``r`` computes against the K/V block of rank ``s`` (one ring step).

    ``q_index`` / ``k_index``: rows of the local q / of the received k, v that can see anything
    (None: all). The rest is provably invisible under the zigzag layout and never computed.
    ``causal`` is only needed on the diagonal block; off it, every selected pair is visible.
    ``visible`` False: no document has a visible (q, k) pair, the block is skipped.
    ``tables``: the Triton kernels' block tables of this step, shared by every layer of the microbatch.
    """

    q_index: Optional[torch.Tensor]
    k_index: Optional[torch.Tensor]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    pos_q: torch.Tensor
    pos_k: torch.Tensor
    causal: bool
    visible: bool
    tables: BlockTables = field(default_factory=BlockTables, repr=False, compare=False)


class ZigzagPlan:
    """The zigzag shard of one packed microbatch, for every CP rank (see the module docstring).

    Per rank ``r`` (local order: document by document, chunk ``r`` then chunk ``2*cp-1-r``):
      ``index(r)``      int64 ``[T/cp]`` positions of its tokens in the full microbatch;
      ``cu_seqlens(r)`` int32 ``[num_docs+1]`` (the same documents on every rank, some empty);
      ``positions(r)``  int32 ``[T/cp]`` true positions within each document;
      ``max_seqlen(r)``.
    """

    def __init__(self, cu_seqlens: torch.Tensor, cp: int, device=None):
        cu = np.asarray(cu_seqlens.tolist(), dtype=np.int64)
        self.cp, self.total = int(cp), int(cu[-1])
        self.device = torch.device(device) if device is not None else cu_seqlens.device
        check_zigzag_length(self.total, cp, "the packed length T")
        self.doc_starts = cu[:-1]
        self.doc_lens = np.diff(cu)
        self.sizes = zigzag_chunk_sizes(self.doc_lens, cp)  # [D, 2cp]
        self.offsets = np.concatenate([np.zeros((len(cu) - 1, 1), np.int64), np.cumsum(self.sizes, 1)], 1)
        self.cu_seqlens_full = cu_seqlens.to(device=self.device, dtype=torch.int32)
        self.max_seqlen_full = int(self.doc_lens.max()) if len(self.doc_lens) else 0
        self._ranks: dict = {}
        self._blocks: dict = {}
        self._gathered: Optional[tuple] = None
        self.tables = BlockTables()  # Ulysses attends over the full microbatch: its block tables

    # ------------------------------------------------------------------ per rank

    def chunks(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.cp - 1 - rank

    def _rank(self, rank: int) -> dict:
        if rank not in self._ranks:
            self._ranks[rank] = self._build_rank(rank)
        return self._ranks[rank]

    def _build_rank(self, rank: int) -> dict:
        a, b = self.chunks(rank)
        lens = np.stack([self.sizes[:, a], self.sizes[:, b]], 1)  # [D, 2]
        in_doc = np.stack([self.offsets[:, a], self.offsets[:, b]], 1)
        index = ranges(self.doc_starts[:, None] + in_doc, lens)
        positions = ranges(in_doc, lens)
        local_lens = lens.sum(1)
        cu = _cumsum0(local_lens)
        return {"lens": local_lens, "cu": cu, "cu_t": self._tensor(cu, torch.int32),
                "index": self._tensor(index, torch.int64), "positions": self._tensor(positions, torch.int32),
                "max": int(local_lens.max(initial=0))}

    def _tensor(self, array: np.ndarray, dtype) -> torch.Tensor:
        return torch.as_tensor(array, dtype=dtype).to(self.device)

    def index(self, rank: int) -> torch.Tensor:
        return self._rank(rank)["index"]

    def cu_seqlens(self, rank: int) -> torch.Tensor:
        return self._rank(rank)["cu_t"]

    def positions(self, rank: int) -> torch.Tensor:
        return self._rank(rank)["positions"]

    def max_seqlen(self, rank: int) -> int:
        return self._rank(rank)["max"]

    # ------------------------------------------------------------------ shard / unshard

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """``[T, ...] -> [T/cp, ...]``: rank ``rank``'s tokens, in its local order."""
        if x.shape[0] != self.total:
            raise ValueError(f"shard: expected {self.total} tokens, got {x.shape[0]}")
        return x.index_select(0, self.index(rank))

    def gathered_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order ``[T]``, inverse ``[T]``): ``order`` = every rank's ``index`` in rank order, i.e. where
        each token of an all-gather over the CP group sits in the full microbatch; ``inverse`` undoes it."""
        if self._gathered is None:
            order = torch.cat([self.index(r) for r in range(self.cp)])
            self._gathered = (order, torch.argsort(order))
        return self._gathered

    def unshard(self, x: torch.Tensor, group) -> torch.Tensor:
        """``[T/cp, ...]`` on every CP rank -> the full ``[T, ...]`` in original order (collective)."""
        return comm.gather_from_context(x, group, self.index(comm.group_rank(group)), self.gathered_index()[1])

    # ------------------------------------------------------------------ ring blocks

    def blocks(self, rank: int, causal: bool) -> list[BlockSpec]:
        """``[cp]`` BlockSpecs of q-rank ``rank``: entry ``s`` is the step against rank ``s``'s K/V."""
        key = (rank, bool(causal))
        if key not in self._blocks:
            self._blocks[key] = [self._block(rank, s, causal) for s in range(self.cp)]
        return self._blocks[key]

    def _block(self, r: int, s: int, causal: bool) -> BlockSpec:
        # Zigzag chunk order: for s < r chunk s precedes both of r's chunks and chunk 2cp-1-s follows
        # them; for s > r only r's late chunk 2cp-1-r follows any of s's chunks. So off the diagonal
        # only one half of one side is needed, and all of it is visible (strictly ordered positions).
        qr, ks = self._rank(r), self._rank(s)
        q_part = k_part = None
        if causal and s < r:
            k_part = self._part(s, first=True)
        elif causal and s > r:
            q_part = self._part(r, first=False)
        q_sel, q_lens, q_pos = q_part or (None, qr["lens"], self.positions(r))
        k_sel, k_lens, k_pos = k_part or (None, ks["lens"], self.positions(s))
        return BlockSpec(
            q_index=q_sel, k_index=k_sel,
            cu_q=self._tensor(_cumsum0(q_lens), torch.int32), cu_k=self._tensor(_cumsum0(k_lens), torch.int32),
            max_q=int(q_lens.max(initial=0)), max_k=int(k_lens.max(initial=0)),
            pos_q=q_pos, pos_k=k_pos, causal=causal and s == r,
            visible=bool(((q_lens > 0) & (k_lens > 0)).any()),
        )

    def _part(self, rank: int, first: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        """(local rows, per-document lengths, positions) of one of ``rank``'s two chunks."""
        a, b = self.chunks(rank)
        chunk = a if first else b
        lens = self.sizes[:, chunk]
        start = self._rank(rank)["cu"][:-1] + (0 if first else self.sizes[:, a])
        rows = self._tensor(ranges(start, lens), torch.int64)
        pos = self._tensor(ranges(self.offsets[:, chunk], lens), torch.int32)
        return rows, lens, pos

    # ------------------------------------------------------------------ analysis (host only)

    def causal_pairs(self, rank: int) -> int:
        """Visible (q, k) pairs of causal attention for ``rank``'s queries: sum of (position + 1)."""
        return int((self.positions(rank).to(torch.int64) + 1).sum())
