"""The LM head fused with cross-entropy: the loss without the ``[T, V]`` logits tensor.

``linear_cross_entropy(hidden, weight, labels)`` equals
``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")`` in fp32, but
works through the tokens a chunk of rows at a time and computes the gradients during the
forward pass (the approach of Liger-Kernel's fused linear cross-entropy):

* each chunk's logits become its softmax in place, then ``softmax - onehot``, which two GEMMs
  turn into the chunk's ``d hidden`` and its share of ``d weight``; backward only scales them;
* no ``[T, V]`` tensor is ever allocated. The unfused path allocates four (logits,
  log-probabilities, the NLL gradient, the log-softmax gradient) and passes over them about
  eight times; on CPU, where every such allocation is fresh memory the kernel must zero,
  that was a quarter of the LM head's time;
* rows whose label is ``ignore_index`` (prompts, image placeholders) are dropped before the
  GEMMs, so they cost nothing.

With the vocabulary split over tensor-parallel ranks (a ColumnParallelLinear head) each rank
does this on its rows of the vocabulary, and the softmax's max and sum are all-reduced per chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from loom.parallel import comm
from loom.parallel.tensor_parallel import ColumnParallelLinear, enter_tp_region

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): fewer, larger GEMMs were faster on CPU
MIN_CHUNK_ROWS = 256


def default_chunk_rows(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, the vocabulary maybe split.

    Forward: hidden ``[T, h]`` (replicated over ``group``), weight ``[V/g, h]`` (this rank's rows
    of the vocabulary, from ``vocab_start``), labels int64 ``[T]`` (global ids) -> fp32 scalar,
    the same on every rank of ``group``: the sum over tokens whose label is not ``ignore_index``.
    With a split vocabulary each chunk takes two all-reduces of ``[c]`` rows (max, then the sum
    of exponentials stacked with the target logit), as Megatron's vocab-parallel cross-entropy does.
    GEMMs run in ``compute_dtype``, the softmax in fp32.
    Backward: ``grad_output`` times the gradients found in forward, in the dtypes of hidden and
    weight; d hidden is this rank's partial sum (the caller's entry into the TP region reduces it).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, vocab_start: int, ignore_index: int, compute_dtype,
                chunk_rows: int, grad_enabled: bool):
        # needs_input_grad is set even under no_grad; evaluation must not pay for gradients.
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        rows = (labels != ignore_index).nonzero().squeeze(1)
        if rows.numel() < labels.numel():  # loss rows only: the others contribute neither loss nor gradient
            h, labels = h.index_select(0, rows), labels.index_select(0, rows)
        local, mine = _local_labels(labels, vocab_start, weight.shape[0], group, ignore_index)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # fp32 [V/g, h], from the first chunk's GEMM
        for start in range(0, h.shape[0], chunk_rows):
            end = start + chunk_rows
            probs = (h[start:end] @ w.t()).float()  # [c, V/g]: becomes d loss / d logits, in place
            loss += _loss_and_dlogits_(probs, local[start:end, None], mine[start:end, None], group,
                                       need_h or need_w)
            if not (need_h or need_w):
                continue
            grad = probs.to(compute_dtype)
            if need_h:
                torch.mm(grad, w, out=grad_h[start:end])
            if need_w:
                grad_w = _add_weight_grad(grad_w, grad, h[start:end])
        if need_w and grad_w is None:  # no loss rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_h and rows.numel() < hidden.shape[0]:
            grad_h = torch.zeros_like(hidden, dtype=grad_h.dtype).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # In place: a second copy of d weight ([V/g, h] fp32) would double the LM head's share of a
        # rank's peak memory. A pipeline that splits the backward (zero bubble) runs this node
        # twice, for d hidden and later for d weight, with the same grad_output: scale only once.
        if getattr(ctx, "scaled", None) is None:
            grad_h, grad_w = (g.mul_(grad_output) if g is not None else None for g in ctx.saved_tensors)
            ctx.scaled = (grad_output, grad_h, grad_w)
        elif not torch.equal(ctx.scaled[0], grad_output):
            raise RuntimeError("LinearCrossEntropy: a second backward through one graph needs the same "
                               "grad_output (its saved gradients are scaled in place)")
        _, grad_h, grad_w = ctx.scaled
        grad_h = grad_h.to(ctx.dtypes[0]) if grad_h is not None else None
        grad_w = grad_w.to(ctx.dtypes[1]) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None


def _local_labels(labels, vocab_start: int, rows_here: int, group, ignore_index: int):
    """(this rank's column of each label, clamped to 0 where it lives elsewhere; [T] bool: here)."""
    vocab = rows_here * comm.group_size(group)
    outside = (labels < 0) | (labels >= vocab)
    if outside.any():  # the masking below would hide them
        raise ValueError(f"labels {labels[outside][:5].tolist()} lie outside the vocabulary [0, {vocab}) "
                         f"(ignore_index={ignore_index})")
    local = labels - vocab_start
    mine = (local >= 0) & (local < rows_here)
    return local.masked_fill(~mine, 0), mine


def _loss_and_dlogits_(logits, local, mine, group, want_grad: bool) -> torch.Tensor:
    """One chunk: fp32 logits ``[c, V/g]`` -> its summed loss; in place, the logits become
    ``softmax - onehot`` when ``want_grad``. Split vocabulary: all-reduce the max, then the sum
    of exponentials stacked with the target logit (held by one rank, zero on the others)."""
    split = comm.group_size(group) > 1
    peak = logits.amax(1, keepdim=True)
    if split:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    target = logits.gather(1, local) * mine
    logits.sub_(peak).exp_()
    total = logits.sum(1, keepdim=True)
    if split:
        both = torch.cat([total, target], dim=1)
        dist.all_reduce(both, group=group)
        total, target = both[:, :1], both[:, 1:]
    if want_grad:
        logits.div_(total).scatter_add_(1, local, -mine.to(logits.dtype))
    return (peak + total.log() - target).sum()


def _add_weight_grad(acc, grad, hidden):
    """``acc + grad.T @ hidden`` in fp32 (``acc`` None: the first chunk), in place where dtypes allow."""
    if acc is None:
        return (grad.t() @ hidden).float()
    if acc.dtype == grad.dtype:
        return acc.addmm_(grad.t(), hidden)
    return acc.add_((grad.t() @ hidden).float())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, group=None,
                         vocab_start: int = 0, ignore_index: int = -100, compute_dtype: Optional[torch.dtype] = None,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """fp32 sum over tokens of the cross-entropy of ``hidden @ weight.T``; see LinearCrossEntropy.

    ``hidden`` may have any leading shape matching ``labels``. With ``group``, ``weight`` is this
    rank's vocabulary rows from ``vocab_start`` and ``hidden`` must already be replicated over the
    group (``lm_head_loss`` does both for a ColumnParallelLinear head). ``compute_dtype``
    (default ``hidden.dtype``) is the GEMMs' dtype, bf16 under mixed precision. ``chunk_rows``
    bounds the rows of logits alive at once (default: about 4M logits).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != LM head input size {weight.shape[-1]}")
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), group,
                                    vocab_start, ignore_index, compute_dtype or hidden.dtype, chunk,
                                    torch.is_grad_enabled())


def lm_head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                 compute_dtype: Optional[torch.dtype] = None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """The LM head ``head`` fused with the summed loss: an ``nn.Linear``, or a vocabulary-split
    ``ColumnParallelLinear`` whose input (``[T, h]``, or ``[T/tp, h]`` under SP) enters the TP
    region first, exactly as its forward would take it."""
    if head.bias is not None:
        raise ValueError("the fused LM head loss supports a head without bias (lm_head.bias is set)")
    group = head.group if isinstance(head, ColumnParallelLinear) else None
    if comm.group_size(group) == 1:
        return linear_cross_entropy(hidden, head.weight, labels, compute_dtype=compute_dtype, chunk_rows=chunk_rows)
    hidden = enter_tp_region(hidden, group, head.input_mode)
    return linear_cross_entropy(hidden, head.weight, labels, group=group,
                                vocab_start=comm.group_rank(group) * head.weight.shape[0],
                                compute_dtype=compute_dtype, chunk_rows=chunk_rows)
