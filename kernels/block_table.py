"""Block tables of the Triton attention kernels, built on the device without a host sync.

A kernel's grid runs over the ``block``-token blocks of every document: program ``j`` reads row
``j`` of an int32 ``[n, 2]`` table, (document, first token of the block). The number of blocks is
a sum over ``cu_seqlens``, which lives on the device; reading it would stall the host once per
kernel launch. So the grid takes a bound known from shapes alone, ``total // block + docs``
(``sum ceil(L_i / B) <= sum (L_i // B + 1) <= total // B + docs``), and the rows past the real
blocks hold document -1: their programs exit at once.

``BlockTables`` keeps the tables of one packed batch, so that every attention layer of a
microbatch, forward and backward, shares one build per (borders, block size).
"""
from __future__ import annotations

import torch


def block_table(cu_seqlens: torch.Tensor, block: int, total: int) -> tuple[torch.Tensor, int]:
    """(int32 ``[2 * n]`` flat (document, first token) rows, ``n`` programs) for ``total`` tokens.

    Real blocks come first, document by document; the remaining rows are (-1, 0).
    """
    cu = cu_seqlens.to(torch.int64)
    docs = cu.numel() - 1
    n = total // block + docs if docs > 0 else 0
    if n == 0:
        return torch.zeros(0, dtype=torch.int32, device=cu.device), 0
    blocks = (cu[1:] - cu[:-1] + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    j = torch.arange(n, device=cu.device)
    doc = torch.searchsorted(ends, j, right=True)
    real = doc < docs
    doc = doc.clamp(max=docs - 1)
    start = cu[doc] + block * (j - (ends - blocks)[doc])
    table = torch.stack([torch.where(real, doc, -1), torch.where(real, start, 0)], dim=1)
    return table.flatten().to(torch.int32), n


class BlockTables:
    """The block tables of one packed batch, built on first use and reused by later launches.

    Pass one instance to every attention call over the same batch (a model's layers, their
    backward, a recompute). Entries are keyed by the borders tensor itself (identity and version,
    so an in-place change rebuilds) with the token count and block size.
    """

    def __init__(self):
        self._tables: dict = {}

    def get(self, cu_seqlens: torch.Tensor, block: int, total: int) -> tuple[torch.Tensor, int]:
        key = (id(cu_seqlens), cu_seqlens._version, block, total)
        hit = self._tables.get(key)
        if hit is None:
            # keeping cu_seqlens alive keeps its id from being reused by another tensor
            hit = self._tables[key] = (cu_seqlens, *block_table(cu_seqlens, block, total))
        return hit[1], hit[2]

    def __len__(self) -> int:
        return len(self._tables)

    def __repr__(self) -> str:
        return f"BlockTables({len(self)} built)"
