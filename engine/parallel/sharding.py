"""One typed sharding spec per parameter: what every consumer needs to know about its parallelism.

``parallelize`` (and only it, through ``set_spec`` and the helpers here) attaches a ``ParamSpec`` to
every parameter it touches; initialisation, gradient reduction, the gradient norm, the optimizer
and checkpoints read it with ``spec_of``. A parameter without one is replicated everywhere.

    splits           ((dim, group), ...), outermost first: each cuts the current extent of ``dim``
                     into ``group_size`` equal chunks and keeps chunk ``group_rank``. TP layers add
                     ``(tp_dim, tp_group)``; expert parallelism adds ``(0, ep_group)`` to stacked expert
                     weights ``[experts, ...]``, and TP inside an expert its own split after it.
    tp_dim           the dim split over TP (None: replicated over TP). Such a shard counts in the
                     gradient norm on every TP rank; a TP-replicated parameter only on TP rank 0.
    tp_partial_grad  replicated over TP, but each TP rank's gradient is partial (norms under SP see a
                     slice of the tokens; q/k-norm and the router a slice of the heads or tokens): the
                     gradient is summed over TP before the optimizer.
    expert           a routed-expert weight: reduced over the expert-data-parallel group, normed over
                     the expert-model-parallel group.
    tied_replica     the last pipeline stage's copy of a tied embedding: its gradient is summed with the
                     first stage's, and it counts once (on the first stage) in norms and gathers.
    rows             the global dim-0 index of each local row, when they are not the one contiguous
                     range the splits give (experts under a balanced placement: a rank may hold experts
                     1 and 6). Checkpoints and initialisation then address the global tensor in runs
                     of consecutive rows (``global_runs``), so the stored order stays logical.

Pipeline stages need no split: they own disjoint parameter names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from loom.parallel import comm

_ATTR = "loom_spec"


@dataclass(frozen=True)
class ParamSpec:
    splits: tuple[tuple[int, Any], ...] = ()
    tp_dim: Optional[int] = None
    tp_partial_grad: bool = False
    expert: bool = False
    tied_replica: bool = False
    rows: Optional[tuple[int, ...]] = None

    @property
    def sharded(self) -> bool:
        return any(comm.group_size(group) > 1 for _, group in self.splits)


_REPLICATED = ParamSpec()


def spec_of(param: torch.Tensor) -> ParamSpec:
    return getattr(param, _ATTR, _REPLICATED)


def set_spec(param: torch.Tensor, **changes) -> torch.Tensor:
    """Replace fields of ``param``'s spec (the others kept). Returns ``param``."""
    setattr(param, _ATTR, dataclasses.replace(spec_of(param), **changes))
    return param


def add_split(param: nn.Parameter | torch.Tensor, dim: int, group) -> nn.Parameter | torch.Tensor:
    """Record that ``param`` is this rank's chunk of dim ``dim`` split over ``group``. Returns ``param``."""
    if dim < 0:
        dim += param.dim()
    if not 0 <= dim < param.dim():
        raise ValueError(f"add_split: dim {dim} out of range for a {param.dim()}-d tensor")
    return set_spec(param, splits=(*spec_of(param).splits, (dim, group)))


def shard_spec(param: torch.Tensor) -> list[tuple[int, object]]:
    return list(spec_of(param).splits)


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


def global_runs(tensor: torch.Tensor) -> tuple[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]]]:
    """``(global_shape, [(first local row, rows, global offsets)])``: where this rank's tensor lies in
    the global one, as runs of local dim-0 rows that are consecutive there (one run unless ``rows``)."""
    spec = spec_of(tensor)
    shape, offsets = global_placement(tensor.shape, spec.splits)
    if spec.rows is None or tensor.dim() == 0:
        return shape, [(0, tensor.shape[0] if tensor.dim() else 1, offsets)]
    runs, start = [], 0
    for i in range(1, len(spec.rows) + 1):
        if i == len(spec.rows) or spec.rows[i] != spec.rows[i - 1] + 1:
            runs.append((start, i - start, (spec.rows[start], *offsets[1:])))
            start = i
    return shape, runs


def unshard(tensor: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped as ``owner``, this rank's shard of it) at its global shape, in global row order,
    on every rank of its split groups: gathered over the splits, innermost first, as global_placement
    nests them. Collective over those groups."""
    spec = spec_of(owner)
    for dim, group in reversed(spec.splits):
        tensor = comm.all_gather(tensor, group, dim)
    if spec.rows is None:
        return tensor
    index = torch.tensor(spec.rows, device=tensor.device)
    for dim, group in reversed(spec.splits):
        if dim == 0:
            index = comm.all_gather(index, group, 0)
    return torch.empty_like(tensor).index_copy_(0, index, tensor)


def is_sharded(param: torch.Tensor) -> bool:
    return spec_of(param).sharded


def counts_in_norm(param: torch.Tensor, tp_rank: int) -> bool:
    """Whether this rank's copy of a non-expert ``param`` counts in a norm over the model-parallel group."""
    spec = spec_of(param)
    return (spec.tp_dim is not None or tp_rank == 0) and not spec.tied_replica
