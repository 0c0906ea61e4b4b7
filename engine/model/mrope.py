"""M-RoPE positions (Qwen2-VL): int64 ``[3, T]`` (temporal, height, width) for a packed batch.

Each document counts from 0. A text token has position ``p`` on all three axes. An image or video
of ``t x h x w`` patches (merge^2 patches per token) placed when the count is ``p`` takes
``(p + time, p + row, p + column)`` for its ``t x h/merge x w/merge`` tokens, where ``time`` is
the temporal patch index (a video's scaled by ``tokens_per_second * seconds per temporal patch``),
and the text after it continues from ``p + max(h, w) / merge``, as transformers' ``get_rope_index``.
Consecutive placeholders of one kind are consecutive images (or videos), each taking its grid in order.
"""
from __future__ import annotations

from typing import Optional

import torch


def _vision_positions(start: int, grid, merge: int, interval: float) -> torch.Tensor:
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    temporal = (torch.arange(t) * torch.tensor(interval, dtype=torch.float32)).long() + start
    tt, hh, ww = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def mrope_positions(input_ids: torch.Tensor, cu_seqlens: Optional[torch.Tensor], image_token_id: Optional[int],
                    video_token_id: Optional[int], image_grid_thw: Optional[torch.Tensor],
                    video_grid_thw: Optional[torch.Tensor], merge: int, tokens_per_second: float,
                    second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[3, T]`` positions of packed ``input_ids [T]`` (``cu_seqlens``: document borders; None: one document)."""
    ids = input_ids.reshape(-1).cpu()
    kind = torch.zeros_like(ids)
    for value, token in ((1, image_token_id), (2, video_token_id)):
        if token is not None:
            kind[ids == token] = value
    grids = {1: iter((image_grid_thw.tolist() if image_grid_thw is not None else [])),
             2: iter((video_grid_thw.tolist() if video_grid_thw is not None else []))}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    borders = cu_seqlens.tolist() if cu_seqlens is not None else [0, ids.numel()]
    out = torch.empty(3, ids.numel(), dtype=torch.long)
    for start, end in zip(borders[:-1], borders[1:]):
        out[:, start:end] = _document(kind[start:end], grids, seconds, merge, tokens_per_second)
    for value, name in ((1, "image_grid_thw"), (2, "video_grid_thw")):
        if next(grids[value], None) is not None:
            raise ValueError(f"{name} has more items than the input_ids have placeholders for")
    return out.to(input_ids.device)


def _document(kind: torch.Tensor, grids: dict, seconds, merge: int, tokens_per_second: float) -> torch.Tensor:
    change = torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), kind.numel()]
    parts, pos = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        k = int(kind[a])
        if k == 0:
            parts.append(torch.arange(pos, pos + b - a).expand(3, -1))
            pos += b - a
            continue
        left = b - a
        while left > 0:  # a run of placeholders may be several images (or videos) back to back
            grid = next(grids[k], None)
            if grid is None:
                raise ValueError(f"input_ids hold more {'image' if k == 1 else 'video'} placeholders than "
                                 f"{'image' if k == 1 else 'video'}_grid_thw has items for")
            interval = 1.0 if k == 1 else tokens_per_second * next(seconds, 1.0)
            parts.append(_vision_positions(pos, grid, merge, interval))
            left -= parts[-1].shape[1]
            pos += max(grid[1], grid[2]) // merge
        if left < 0:
            raise ValueError(f"a run of {b - a} {'image' if k == 1 else 'video'} placeholders ends inside an item "
                             "of its grid_thw (placeholder counts and grids disagree)")
    return torch.cat(parts, dim=1) if parts else torch.empty(3, 0, dtype=torch.long)
