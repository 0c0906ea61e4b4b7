"""Index arithmetic shared by the context-parallel plan and the expert-parallel dispatcher."""
from __future__ import annotations

import torch


def ranges(starts, lengths) -> torch.Tensor:
    """Concatenation of ``arange(s, s + n)`` for each (s, n), vectorised; int64, on ``starts``' device.

    Accepts tensors or array-likes (host-side plans pass numpy arrays)."""
    starts = torch.as_tensor(starts, dtype=torch.int64).reshape(-1)
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=starts.device).reshape(-1)
    total = int(lengths.sum())
    shift = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
    return torch.arange(total, device=starts.device) + shift
