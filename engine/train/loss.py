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

Single-device math: the trainer uses it when the vocabulary is not split over tensor-parallel
ranks, and ``vocab_parallel_cross_entropy`` on logits otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MiB in fp32): fewer, larger GEMMs were faster on CPU
MIN_CHUNK_ROWS = 256


def default_chunk_rows(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``.

    Forward: hidden ``[T, h]``, weight ``[V, h]``, labels int64 ``[T]`` -> fp32 scalar (the sum
    over tokens whose label is not ``ignore_index``). GEMMs run in ``compute_dtype``, the
    softmax in fp32. Backward: ``grad_output`` times the gradients found in forward, in the
    dtypes of hidden and weight; none for labels.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, compute_dtype, chunk_rows: int, grad_enabled: bool):
        # needs_input_grad is set even under no_grad; evaluation must not pay for gradients.
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        rows = (labels != ignore_index).nonzero().squeeze(1)
        if rows.numel() < labels.numel():  # loss rows only: the others contribute neither loss nor gradient
            h, labels = h.index_select(0, rows), labels.index_select(0, rows)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None  # fp32 [V, h], from the first chunk's GEMM
        for start in range(0, h.shape[0], chunk_rows):
            hc, yc = h[start:start + chunk_rows], labels[start:start + chunk_rows, None]
            probs = (hc @ w.t()).float()  # [c, V]: becomes the softmax, then its gradient, in place
            target = probs.gather(1, yc)
            peak = probs.amax(1, keepdim=True)
            probs.sub_(peak).exp_()
            total = probs.sum(1, keepdim=True)
            loss += (peak + total.log() - target).sum()
            if not (need_h or need_w):
                continue
            probs.div_(total).scatter_add_(1, yc, torch.full_like(target, -1.0))
            grad = probs.to(compute_dtype)
            if need_h:
                torch.mm(grad, w, out=grad_h[start:start + chunk_rows])
            if need_w and grad_w is None:
                grad_w = (grad.t() @ hc).float()
            elif need_w and grad_w.dtype == grad.dtype:
                grad_w.addmm_(grad.t(), hc)
            elif need_w:
                grad_w += (grad.t() @ hc).float()
        if need_w and grad_w is None:  # no loss rows at all
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if need_h and rows.numel() < hidden.shape[0]:
            grad_h = torch.zeros_like(hidden, dtype=grad_h.dtype).index_copy_(0, rows, grad_h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad_output).to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = (grad_w * grad_output).to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = -100, compute_dtype: Optional[torch.dtype] = None,
                         chunk_rows: Optional[int] = None) -> torch.Tensor:
    """fp32 sum over tokens of the cross-entropy of ``hidden @ weight.T``; see LinearCrossEntropy.

    ``hidden`` may have any leading shape matching ``labels``. ``compute_dtype`` (default
    ``hidden.dtype``) is the GEMMs' dtype, bf16 under mixed precision. ``chunk_rows`` bounds
    the rows of logits alive at once (default: about 4M logits).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != LM head input size {weight.shape[-1]}")
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    if chunk < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                    ignore_index, compute_dtype or hidden.dtype, chunk, torch.is_grad_enabled())
