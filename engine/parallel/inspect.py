"""Looking at a sharded model as if it were whole: parameters and gradients at their full shapes, and
whether replicated copies agree. For tests, tools and debugging; training itself never gathers."""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn

from loom.parallel import comm
from loom.parallel.mesh import ParallelGroups
from loom.parallel.sharding import spec_of, unshard


def full_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter at its full (unsharded) shape, identical on all ranks. Collective over TP and PP."""
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = unshard(param.detach(), param).clone()
    return _union_over_stages(out, groups)


def full_grads(model: nn.Module, groups: ParallelGroups, grad_of=None) -> dict[str, torch.Tensor]:
    """Like ``full_state_dict`` but for the reduced gradients: ``grad_of(param)`` (the trainer's
    ``grads.local_grad``, collective with the distributed optimizer), by default ``param.grad``.

    A tied weight is listed once, as at world size 1: the last stage's copy is skipped.
    """
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen: no grad
            continue
        grad = grad_of(param) if grad_of is not None else param.grad
        if spec_of(param).tied_replica:
            continue
        out[name] = unshard(grad.detach(), param).clone()
    return _union_over_stages(out, groups)


def _union_over_stages(local: dict[str, torch.Tensor], groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Merge the stages' disjoint name -> tensor dicts (on CPU) over the pp group."""
    if comm.group_size(groups.pp) == 1:
        return local
    parts = [None] * comm.group_size(groups.pp)
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=groups.pp)
    return {k: v for part in parts for k, v in part.items()}


def replicas_out_of_sync(model: nn.Module, groups: ParallelGroups) -> dict[str, list[int]]:
    """Parameters whose copies differ across ranks: ``{name: ranks that disagree with rank 0}``.

    Every rank joins its full parameters (TP and expert shards gathered, stages merged), so copies
    in sync give the same bytes on every rank, and one digest per tensor finds any drift of a DP,
    CP, TP-replicated or expert-data-parallel replica. Collective over the world.
    """
    full = full_state_dict(model, groups)
    digests = {name: hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()
               for name, t in full.items()}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, digests)
    out = {}
    for name, digest in every[0].items():
        ranks = [r for r, d in enumerate(every) if d.get(name) != digest]
        if ranks:
            out[name] = ranks
    return out
