"""Tensor-parallel layers (Megatron style) with optional sequence parallelism.

Each parameter's ``ParamSpec`` (sharding.py) records its TP split (``tp_dim`` and a ``(tp_dim, group)``
split) or, for a replicated parameter whose TP ranks see only part of its inputs, ``tp_partial_grad``.

A LoRA adapter (engine/model/lora.py) rides with its layer. Column-parallel: A ``[r, in]`` replicated,
B ``[out/tp, r]`` split by output, so each rank makes its own output columns; A's gradient is partial
(each rank back-propagates through its B columns only) and is summed over TP. Row-parallel: A
``[r, in/tp]`` split by input, B ``[out, r]`` replicated; ``B A x`` is linear in each rank's input
slice, so it joins the base layer's partial sums before their one reduction (no extra collective),
and B's gradient, made from the rank's partial ``A x``, is summed over TP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.model.lora import LoRALinear, lora_delta
from loom.model.quant import base_linear
from loom.parallel import comm
from loom.parallel.sharding import add_split, set_spec


def mark(param: nn.Parameter, tp_dim=None, partial=False, group=None) -> nn.Parameter:
    set_spec(param, tp_dim=tp_dim, tp_partial_grad=partial)
    if tp_dim is not None and group is not None:
        add_split(param, tp_dim, group)
    return param


def _shard(full: torch.Tensor, group, dim: int) -> torch.Tensor:
    return comm.split(full.detach(), group, dim).clone()


def carry_lora(layer: nn.Module, linear: nn.Module, group, column: bool) -> None:
    """Move ``linear``'s adapter (if any) onto its tensor-parallel replacement ``layer``, sharded."""
    layer.lora_A = layer.lora_B = None
    if not isinstance(linear, LoRALinear):
        return
    a, b = linear.lora_A, linear.lora_B
    if column:
        layer.lora_A = mark(nn.Parameter(a.detach().clone()), partial=True)
        layer.lora_B = mark(nn.Parameter(_shard(b, group, 0)), tp_dim=0, group=group)
    else:
        layer.lora_A = mark(nn.Parameter(_shard(a, group, 1)), tp_dim=1, group=group)
        layer.lora_B = mark(nn.Parameter(b.detach().clone()), partial=True)
    layer.lora_scaling, layer.lora_dropout = linear.lora_scaling, linear.lora_dropout


def _adapted(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if layer.lora_A is None:
        return y
    return y + lora_delta(x, layer.lora_A, layer.lora_B, layer.lora_scaling, layer.lora_dropout, layer.training)


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

    supports_nf4 = True  # QLoRA may put the NF4 form of this rank's rows in the weight slot

    def __init__(self, weight: torch.Tensor, bias, group, input_mode="copy", gather_output=False):
        super().__init__()
        if input_mode not in ("copy", "gather", "none"):
            raise ValueError(f"input_mode={input_mode!r} must be copy, gather or none")
        self.group, self.input_mode, self.gather_output = group, input_mode, gather_output
        self.lora_A = self.lora_B = None  # carry_lora's
        self.weight = mark(nn.Parameter(weight), tp_dim=0, group=group)
        self.bias = mark(nn.Parameter(bias), tp_dim=0, group=group) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "ColumnParallelLinear":
        bias = _shard(linear.bias, group, 0) if linear.bias is not None else None
        layer = cls(_shard(linear.weight, group, 0), bias, group, **kw)
        carry_lora(layer, linear, group, column=True)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tp_region(x, self.group, self.input_mode)
        y = _adapted(self, x, base_linear(x, self, self.bias))
        return comm.gather(y, self.group, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by input features; partial sums are reduced over TP.

    input: ``[T, in/tp]``. output: ``[T, out]``, or ``[T/tp, out]`` under SP (reduce-scattered).
    """

    supports_nf4 = True  # QLoRA may put the NF4 form of this rank's input columns in the weight slot

    def __init__(self, weight: torch.Tensor, bias, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.lora_A = self.lora_B = None  # carry_lora's
        self.weight = mark(nn.Parameter(weight), tp_dim=1, group=group)
        # Added after the reduction, so replicated; under SP each rank adds it to its token slice.
        self.bias = mark(nn.Parameter(bias), partial=sequence_parallel) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "RowParallelLinear":
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        layer = cls(_shard(linear.weight, group, 1), bias, group, **kw)
        carry_lora(layer, linear, group, column=False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _adapted(self, x, base_linear(x, self))
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
