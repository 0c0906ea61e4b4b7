"""Tensor-parallel layers (Megatron style) with optional sequence parallelism.

Parameters carry two marks that the rest of the engine reads:
- ``param.tp_dim``: the dim along which the parameter is split over TP (None: replicated).
  Sharded parameters are gathered along it and counted on every TP rank in the grad norm.
- ``param.tp_partial_grad``: a replicated parameter whose gradient is only partial on each TP
  rank (norms under SP see a slice of the tokens; q/k-norm sees a slice of the heads), so its
  gradient is summed over TP before the optimizer.
Sharded parameters also get a ``(tp_dim, group)`` split in their shard spec (see sharding.py),
which is what checkpoints read to save global shapes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from engine.parallel import comm
from engine.parallel.sharding import add_split


def mark(param: nn.Parameter, tp_dim=None, partial=False, group=None) -> nn.Parameter:
    param.tp_dim = tp_dim
    param.tp_partial_grad = partial
    if tp_dim is not None and group is not None:
        add_split(param, tp_dim, group)
    return param


def _shard(full: torch.Tensor, group, dim: int) -> torch.Tensor:
    return comm.split(full.detach(), group, dim).clone()


def enter_tp_region(x: torch.Tensor, group, mode: str) -> torch.Tensor:
    """Make ``x`` the replicated full-sequence input of tensor-parallel layers (see ColumnParallelLinear)."""
    if mode == "gather":
        return comm.gather(x, group, 0, reduce_grad=True)
    if mode == "copy":
        return comm.copy_to_region(x, group)
    return x


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by output features.

    input: ``[T, in]`` replicated, or ``[T/tp, in]`` under SP; ``input_mode`` says how it enters
    the TP region: ``copy`` (identity, all-reduce in backward), ``gather`` (SP all-gather,
    reduce-scatter in backward) or ``none`` (the caller already did it once for several layers,
    e.g. q/k/v share one gather).
    output: ``[T, out/tp]``, or ``[T, out]`` with ``gather_output``.
    """

    def __init__(self, weight: torch.Tensor, bias, group, input_mode="copy", gather_output=False):
        super().__init__()
        if input_mode not in ("copy", "gather", "none"):
            raise ValueError(f"input_mode={input_mode!r} must be copy, gather or none")
        self.group, self.input_mode, self.gather_output = group, input_mode, gather_output
        self.weight = mark(nn.Parameter(weight), tp_dim=0, group=group)
        self.bias = mark(nn.Parameter(bias), tp_dim=0, group=group) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "ColumnParallelLinear":
        bias = _shard(linear.bias, group, 0) if linear.bias is not None else None
        return cls(_shard(linear.weight, group, 0), bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.group, self.input_mode)
        y = F.linear(x, self.weight, self.bias)
        return comm.gather(y, self.group, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by input features; partial sums are reduced over TP.

    input: ``[T, in/tp]``. output: ``[T, out]``, or ``[T/tp, out]`` under SP (reduce-scattered).
    """

    def __init__(self, weight: torch.Tensor, bias, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = mark(nn.Parameter(weight), tp_dim=1, group=group)
        # Added after the reduction, so replicated; under SP each rank adds it to its token slice.
        self.bias = mark(nn.Parameter(bias), partial=sequence_parallel) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "RowParallelLinear":
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(_shard(linear.weight, group, 1), bias, group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence(y, self.group)
        else:
            y = comm.reduce_from_region(y, self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows.

    input: token ids ``[T]``. output: ``[T, h]``, or ``[T/tp, h]`` under SP.
    Each rank looks up the ids it owns, zeroes the rest, and the ranks sum.
    """

    def __init__(self, weight: torch.Tensor, group, vocab_start: int, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.vocab_start = vocab_start
        self.weight = mark(nn.Parameter(weight), tp_dim=0, group=group)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, **kw) -> "VocabParallelEmbedding":
        weight = _shard(emb.weight, group, 0)
        return cls(weight, group, comm.group_rank(group) * weight.shape[0], **kw)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(out, self.group)
        return comm.reduce_from_region(out, self.group)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits, without gathering them.

    forward: logits ``[T, V/tp]`` (this rank's vocab slice starting at ``vocab_start``),
    labels ``[T]`` (global ids, -100 ignored) -> per-token loss ``[T]`` in fp32, identical on
    every TP rank. Three all-reduces of ``[T]``: max, sum of exp, target logit.
    backward: ``softmax - onehot`` on the local slice, scaled by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start):
        logits = logits.float()
        logits_max = logits.max(dim=-1).values
        if comm.group_size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = labels - vocab_start
        in_range = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~in_range, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * in_range
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if comm.group_size(group) > 1:
            both = torch.stack([target, sum_exp])
            dist.all_reduce(both, group=group)
            target, sum_exp = both[0], both[1]
        valid = labels != -100
        loss = (sum_exp.log() - target) * valid
        exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(exp, local, in_range, valid)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, in_range, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local.unsqueeze(-1), -in_range.to(grad.dtype).unsqueeze(-1))
        grad.mul_((g * valid).unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(logits, labels, group, vocab_start: int = 0) -> torch.Tensor:
    """Per-token loss ``[T]`` (fp32, 0 where labels == -100); see VocabParallelCrossEntropy.

    For callers that hold logits; training fuses the head into its loss instead
    (engine/train/loss.py), which never builds the ``[T, V/tp]`` logits.

    With the whole vocabulary on this rank it is plain cross-entropy: the fused log-softmax
    kernel is faster than the split max / exp / sum the parallel form needs.
    """
    if comm.group_size(group) == 1:
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                               reduction="none")
        return flat.reshape(labels.shape)
    return VocabParallelCrossEntropy.apply(logits, labels, group, vocab_start)
