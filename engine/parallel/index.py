"""Index arithmetic shared by the context-parallel plan and the expert-parallel dispatcher."""
from __future__ import annotations

from typing import Optional

import torch


def ranges(starts, lengths, total: Optional[int] = None) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised; int64, on ``starts``' device.

    Accepts tensors or array-likes (host-side plans pass numpy arrays). ``total``: the sum of the
    lengths if the caller knows it, which saves reading it from the device (a sync)."""
    starts = torch.as_tensor(starts, dtype=torch.int64).reshape(-1)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=starts.device).reshape(-1)
    total = int(lengths.sum()) if total is None else total
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift


def flat_boxes(shape, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    """The flat (row-major) elements ``[lo, hi)`` of a ``shape`` tensor as a few boxes.

    Returns ``(offsets, sizes, start, end)`` per box, in order: each box is a block of the tensor
    and exactly its flat elements ``[start, end)``, so a flat slice of an optimizer shard can be
    stored as chunks of the parameter's global tensor. At most ``2 * len(shape) - 1`` boxes.
    """
    shape = tuple(shape)
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [((lo,), (hi - lo,), lo, hi)] if shape else [((), (), lo, hi)]
    inner = 1
    for n in shape[1:]:
        inner *= n
    r0, c0 = divmod(lo, inner)
    r1, c1 = divmod(hi, inner)

    def within(row: int, a: int, b: int):
        return [((row, *o), (1, *s), row * inner + x, row * inner + y) for o, s, x, y in flat_boxes(shape[1:], a, b)]

    if r0 == r1:
        return within(r0, c0, c1)
    out = []
    if c0:
        out += within(r0, c0, inner)
        r0 += 1
    if r1 > r0:
        out.append(((r0, *(0,) * (len(shape) - 1)), (r1 - r0, *shape[1:]), r0 * inner, r1 * inner))
    if c1:
        out += within(r1, 0, c1)
    return out
