"""Where a rank's local tensor sits inside the global (unsharded) tensor.

Every parallelism that splits a parameter records the split on it, so checkpoints can be saved
with global shapes and loaded under any other layout without knowing which parallelism did what:

    param.shard_spec = [(dim, group), ...]   # outermost split first

Each ``(dim, group)`` cuts the current extent of ``dim`` into ``group_size`` equal chunks and
keeps chunk ``group_rank``. TP layers add ``(tp_dim, tp_group)``; expert parallelism adds
``(0, ep_group)`` to stacked expert weights ``[experts, ...]`` (and TP inside an expert adds its
own split after it). A parameter without splits is replicated: every rank holds all of it, and a
checkpoint stores it once. Pipeline stages need no mark: they own disjoint parameter names.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.parallel import comm


def add_split(param: nn.Parameter | torch.Tensor, dim: int, group) -> nn.Parameter | torch.Tensor:
    """Record that ``param`` is this rank's chunk of dim ``dim`` split over ``group``. Returns ``param``."""
    if dim < 0:
        dim += param.dim()
    if not 0 <= dim < param.dim():
        raise ValueError(f"add_split: dim {dim} out of range for a {param.dim()}-d tensor")
    param.shard_spec = [*getattr(param, "shard_spec", []), (dim, group)]
    return param


def shard_spec(param: torch.Tensor) -> list[tuple[int, object]]:
    return list(getattr(param, "shard_spec", []))


def global_placement(local_shape, spec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(global_shape, offsets)`` of a local tensor of ``local_shape`` split as ``spec`` describes.

    Splits of one dim nest: the innermost (last) split is the finest, so the offset along a dim
    is a mixed-radix number whose digits are the group ranks.
    """
    shape, offsets = list(local_shape), [0] * len(local_shape)
    for dim, group in reversed(spec):
        n, r = comm.group_size(group), comm.group_rank(group)
        offsets[dim] += r * shape[dim]
        shape[dim] *= n
    return tuple(shape), tuple(offsets)


def is_sharded(param: torch.Tensor) -> bool:
    return any(comm.group_size(group) > 1 for _, group in shard_spec(param))
