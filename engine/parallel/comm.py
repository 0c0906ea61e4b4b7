"""Collectives as named autograd Functions. Each takes its process group explicitly.

Each pair is the exact mirror of the other: the backward of one is the forward of its twin.
Shapes are given per rank for a group of size ``n``; ``T`` is the packed token dimension
(dim 0, the one sequence and context parallelism split) and ``h`` the last dimension.
``Scatter`` and ``Gather`` split a tensor along a dimension and join it back: every rank keeps a
chunk (they are not torch.distributed's rooted scatter and gather).
Functions given ``stats`` (a ``cp_plan.CommStats``) add to it the bytes that leave this rank.
With a group of size 1 every Function but ``GatherFromContext`` (a reordering) is the identity.

Under ``torch.compile`` (``train.compile``) each of the functions at the bottom is a graph break:
the collective runs eagerly, through torch.distributed's own functions, which the interceptors
(traffic counts, collective timeouts, the pre-flight dry run) patch, instead of being traced
into a functional collective they would never see.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


# torch renamed the tensor-in/tensor-out collectives; keep one spelling here. Looked up at each call,
# so that whatever wraps torch.distributed's functions (tools/traffic.py's counter) sees these too.
def _all_gather_single(out, x, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


def _reduce_scatter_single(out, x, group, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, group=group, async_op=async_op)


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


def any_rank(flag: bool, group, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank of ``group`` (None: the world): one int32 max all-reduce,
    so every rank takes the same branch. Per rank: a bool in, the same bool out everywhere."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def first_text(text: str | None, group, device: torch.device) -> str | None:
    """The ``text`` of the lowest rank of ``group`` (None: the world) that has one, on every rank, or None.

    One ``any_rank`` when no rank has any; only then are the texts gathered (as objects), so the rare
    case (a bad sample one replica found) ends every rank with the same message."""
    if not any_rank(text is not None, group, device):
        return None
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return text
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, text, group=group)
    return next(t for t in every if t is not None)


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


class _AllWorks:
    """The handles of several async ops, waited on as one."""

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def _copies_whole_buffer(group) -> bool:
    # gloo's reduce-scatter and all-gather copy the whole flat buffer (measured: +100% of it per call);
    # its reduce and broadcast work in place. NCCL's reduce-scatter and all-gather are in place.
    return dist.get_backend(group) == "gloo"


def reduce_scatter_flat(shard: torch.Tensor, flat: torch.Tensor, group, async_op: bool = False):
    """Gradient buckets (no autograd): ``shard`` (this rank's ``[numel/n]`` slice, a view of ``flat``)
    receives the sum over the group of that slice of every rank's ``flat [numel]``; the rest of
    ``flat`` is left undefined. On gloo: one in-place reduce per rank's slice, the same bytes sent."""
    if not _copies_whole_buffer(group):
        return _reduce_scatter_single(shard, flat, group=group, async_op=async_op)
    n, ranks = group_size(group), dist.get_process_group_ranks(group)
    size = flat.numel() // n
    works = [dist.reduce(flat[i * size:(i + 1) * size], dst=ranks[i], group=group, async_op=True) for i in range(n)]
    return _finish(_AllWorks(works), async_op)


def all_gather_flat(flat: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Parameter buckets (no autograd): ``flat [numel]`` gets every rank's ``shard [numel/n]``, in rank
    order. On gloo: each rank broadcasts its slice in place."""
    if not _copies_whole_buffer(group):
        return _all_gather_single(flat, shard, group=group, async_op=async_op)
    n, rank, ranks = group_size(group), group_rank(group), dist.get_process_group_ranks(group)
    size = flat.numel() // n
    mine = flat[rank * size:(rank + 1) * size]
    if mine.data_ptr() != shard.data_ptr():
        mine.copy_(shard)
    works = [dist.broadcast(flat[i * size:(i + 1) * size], src=ranks[i], group=group, async_op=True)
             for i in range(n)]
    return _finish(_AllWorks(works), async_op)


def _finish(work, async_op: bool):
    if async_op:
        return work
    work.wait()
    return None


def split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: dim {dim} of size {x.shape[dim]} is not divisible by group size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _all_to_all(x: torch.Tensor, group, out_splits=None, in_splits=None) -> torch.Tensor:
    """Row block j of ``x`` goes to rank j; row block j of the result came from rank j.
    Without splits every block has ``len(x) / n`` rows."""
    x = x.contiguous()
    out = torch.empty_like(x) if out_splits is None else x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


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


# ----------------------------------------------------------------------------- split along a dimension


class Scatter(torch.autograd.Function):
    """forward: keep this rank's chunk of ``dim``: the tokens, ``[T, h] -> [T/n, h]`` (dim 0, entering
    a sequence-parallel region), or the features, ``[T, h] -> [T, h/n]`` (dim -1).
    backward: all-gather ``dim``, ``[T/n, h] -> [T, h]`` / ``[T, h/n] -> [T, h]``."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class Gather(torch.autograd.Function):
    """forward: all-gather ``dim``: the tokens, ``[T/n, h] -> [T, h]`` (dim 0), or the features,
    ``[T, h/n] -> [T, h]`` (dim -1).

    backward: keep this rank's chunk of the gradient, ``[T, h] -> [T/n, h]`` / ``[T, h] -> [T, h/n]``;
    with ``reduce_grad`` (the consumer is tensor-parallel, so each rank holds a partial gradient of
    the whole tensor) reduce-scatter instead.
    """

    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad=False):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        grad = reduce_scatter(g, ctx.group, ctx.dim) if ctx.reduce_grad else split(g, ctx.group, ctx.dim)
        return grad, None, None, None


# ----------------------------------------------------------------------------- sequence-parallel region


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


# ----------------------------------------------------------------------------- context parallelism


class GatherFromContext(torch.autograd.Function):
    """Undo a token permutation sharded over the group (the CP zigzag shard).

    ``index [T/n]``: where this rank's tokens sit in the full sequence; ``inverse [T]``: where each
    token of the full sequence sits in the all-gather of every rank's shard (rank order).
    forward: all-gather and restore the order, ``[T/n, ...] -> [T, ...]`` (identical on every rank).
    backward: this rank's rows of the gradient, ``[T, ...] -> [T/n, ...]`` (the consumer is
    replicated, so each rank's gradient is already the whole one).
    """

    @staticmethod
    def forward(ctx, x, group, index, inverse):
        ctx.index = index
        return all_gather(x, group, 0).index_select(0, inverse)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.index), None, None, None


def _count(stats, kind: str, sent: torch.Tensor, n: int) -> None:
    """Bytes of an equal-block all-to-all that leave this rank: every block but its own."""
    if stats is not None:
        stats.add(kind, sent.numel() * sent.element_size() * (n - 1) // n)


def _seq_to_heads(x: torch.Tensor, group, stats, kind: str) -> torch.Tensor:
    """``[T/n, H, D] -> [T, H/n, D]``: every rank's tokens (rank order), this rank's head group."""
    n = group_size(group)
    t, h, d = x.shape
    send = x.reshape(t, n, h // n, d).transpose(0, 1).contiguous()
    recv = _all_to_all(send, group)
    _count(stats, kind, send, n)
    return recv.reshape(n * t, h // n, d)


def _heads_to_seq(x: torch.Tensor, group, stats, kind: str) -> torch.Tensor:
    """``[T, H/n, D] -> [T/n, H, D]``: this rank's tokens, every head group (rank order)."""
    n = group_size(group)
    t, h, d = x.shape
    send = x.reshape(n, t // n, h, d).contiguous()
    recv = _all_to_all(send, group)
    _count(stats, kind, send, n)
    return recv.transpose(0, 1).reshape(t // n, n * h, d)


class SeqToHeads(torch.autograd.Function):
    """Ulysses: trade the sequence split for a head split. Counts ``ulysses_fwd`` / ``ulysses_bwd`` bytes.

    forward: all-to-all ``[T/n, H, D]`` (own tokens, all heads) -> ``[T, H/n, D]`` (every rank's
    tokens in rank order, own head group).
    backward: the mirror, ``[T, H/n, D] -> [T/n, H, D]``.
    """

    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return _seq_to_heads(x, group, stats, "ulysses_fwd")

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.stats, "ulysses_bwd"), None, None


class HeadsToSeq(torch.autograd.Function):
    """Ulysses: back from the head split to the sequence split. Counts ``ulysses_fwd`` / ``ulysses_bwd`` bytes.

    forward: all-to-all ``[T, H/n, D]`` -> ``[T/n, H, D]``.
    backward: the mirror, ``[T/n, H, D] -> [T, H/n, D]``.
    """

    @staticmethod
    def forward(ctx, x, group, stats):
        ctx.group, ctx.stats = group, stats
        return _heads_to_seq(x, group, stats, "ulysses_fwd")

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.stats, "ulysses_bwd"), None, None


# ----------------------------------------------------------------------------- expert parallelism


class AllToAll(torch.autograd.Function):
    """Exchange variable-size blocks of rows (equal blocks when the splits are None).

    forward: ``x [sum(in_splits), ...]`` whose j-th block of ``in_splits[j]`` rows goes to rank j
    -> ``[sum(out_splits), ...]`` whose j-th block of ``out_splits[j]`` rows came from rank j;
    e.g. the EP dispatch, ``[N, h]`` rows grouped by destination -> ``[R, h]`` grouped by source.
    backward: the same exchange with the splits swapped, so each gradient block returns to the
    rank that sent the rows.
    """

    @staticmethod
    def forward(ctx, x, group, out_splits=None, in_splits=None):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _all_to_all(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


@torch.compiler.disable
def copy_to_region(x, group):
    return CopyToRegion.apply(x, group) if group_size(group) > 1 else x


@torch.compiler.disable
def reduce_from_region(x, group):
    return ReduceFromRegion.apply(x, group) if group_size(group) > 1 else x


@torch.compiler.disable
def scatter(x, group, dim: int):
    return Scatter.apply(x, group, dim) if group_size(group) > 1 else x


@torch.compiler.disable
def gather(x, group, dim: int, reduce_grad: bool = False):
    return Gather.apply(x, group, dim, reduce_grad) if group_size(group) > 1 else x


@torch.compiler.disable
def reduce_scatter_to_sequence(x, group):
    return ReduceScatterToSequence.apply(x, group) if group_size(group) > 1 else x


@torch.compiler.disable
def gather_from_context(x, group, index, inverse):
    return GatherFromContext.apply(x, group, index, inverse)


@torch.compiler.disable
def seq_to_heads(x, group, stats=None):
    return SeqToHeads.apply(x, group, stats) if group_size(group) > 1 else x


@torch.compiler.disable
def heads_to_seq(x, group, stats=None):
    return HeadsToSeq.apply(x, group, stats) if group_size(group) > 1 else x


@torch.compiler.disable
def all_to_all(x, group, out_splits=None, in_splits=None):
    """See AllToAll. Also serves non-differentiable exchanges (e.g. the EP row counts)."""
    return AllToAll.apply(x, group, out_splits, in_splits) if group_size(group) > 1 else x
