"""Collectives as named autograd Functions. Each takes its process group explicitly.

Each pair is the exact mirror of the other: the backward of one is the forward of its twin.
Shapes are given per rank for a group of size ``n``; ``T`` is the packed token dimension
(dim 0, the one sequence parallelism splits) and ``h`` the last dimension.
With a group of size 1 every Function is the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch renamed the tensor-in/tensor-out collectives; keep one spelling here.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- raw ops


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group into a fresh tensor (inputs may be saved by autograd elsewhere)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    if x.shape[0] % n:
        raise ValueError(f"reduce_scatter: dim {dim} of size {x.shape[0]} is not divisible by group size {n}")
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim)


def split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by group size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# ----------------------------------------------------------------------------- tensor-parallel region


class CopyToRegion(torch.autograd.Function):
    """Enter a tensor-parallel region.

    forward: identity, ``[..., h] -> [..., h]`` (replicated on every rank).
    backward: all-reduce (sum) the gradient, since every rank's partial consumer contributes.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """Leave a tensor-parallel region by summing partial results.

    forward: all-reduce (sum), ``[..., h] -> [..., h]``.
    backward: identity.
    """

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class ScatterToRegion(torch.autograd.Function):
    """forward: keep this rank's slice of the last dim, ``[..., h] -> [..., h/n]``.
    backward: all-gather the last dim, ``[..., h/n] -> [..., h]``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, -1), None


class GatherFromRegion(torch.autograd.Function):
    """forward: all-gather the last dim, ``[..., h/n] -> [..., h]``.
    backward: keep this rank's slice, ``[..., h] -> [..., h/n]``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group, -1)

    @staticmethod
    def backward(ctx, g):
        return split(g, ctx.group, -1), None


# ----------------------------------------------------------------------------- sequence-parallel region


class ScatterToSequence(torch.autograd.Function):
    """forward: keep this rank's chunk of the tokens, ``[T, ...] -> [T/n, ...]``.
    backward: all-gather the tokens, ``[T/n, ...] -> [T, ...]``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, 0), None


class GatherFromSequence(torch.autograd.Function):
    """forward: all-gather the tokens, ``[T/n, ...] -> [T, ...]``.

    backward: with ``reduce_grad`` (the consumer is tensor-parallel, so each rank holds a partial
    gradient of the full sequence) reduce-scatter, ``[T, ...] -> [T/n, ...]``; otherwise split.
    """

    @staticmethod
    def forward(ctx, x, group, reduce_grad=True):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return all_gather(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        grad = reduce_scatter(g, ctx.group, 0) if ctx.reduce_grad else split(g, ctx.group, 0)
        return grad, None, None


class ReduceScatterToSequence(torch.autograd.Function):
    """forward: sum partial results and keep this rank's tokens, ``[T, ...] -> [T/n, ...]``.
    backward: all-gather the tokens, ``[T/n, ...] -> [T, ...]``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, group, 0)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, 0), None


def copy_to_region(x, group):
    return CopyToRegion.apply(x, group) if group_size(group) > 1 else x


def reduce_from_region(x, group):
    return ReduceFromRegion.apply(x, group) if group_size(group) > 1 else x


def scatter_to_region(x, group):
    return ScatterToRegion.apply(x, group) if group_size(group) > 1 else x


def gather_from_region(x, group):
    return GatherFromRegion.apply(x, group) if group_size(group) > 1 else x


def scatter_to_sequence(x, group):
    return ScatterToSequence.apply(x, group) if group_size(group) > 1 else x


def gather_from_sequence(x, group, reduce_grad=True):
    return GatherFromSequence.apply(x, group, reduce_grad) if group_size(group) > 1 else x


def reduce_scatter_to_sequence(x, group):
    return ReduceScatterToSequence.apply(x, group) if group_size(group) > 1 else x
