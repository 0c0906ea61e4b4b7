"""The one place that calls the third-party ``flash_attn`` package, through its public API only.

flash-attn cannot express our true-position masks, so it is used only where positions are the
default ones and, for causal attention, where q and k documents have equal lengths (flash-attn
aligns the causal diagonal bottom-right when they differ; our rule is pos_k <= pos_q, top-left).
"""
from __future__ import annotations

import importlib.util

import torch


def is_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _import():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("backend='flash_attn' was requested but flash-attn is not installed "
                           "(pip install flash-attn, CUDA only); use backend='triton' or 'torch'") from e
    return flash_attn_varlen_func


def _check_positions(pos, cu, total, side):
    if pos is None:
        return
    from loom.kernels.reference import default_positions
    if not torch.equal(pos.to(torch.int32), default_positions(cu, total)):
        raise ValueError(f"backend='flash_attn' cannot mask by custom positions (pos_{side} is not 0, 1, 2, ... "
                         "per document); use backend='triton' or 'torch'")


def _lse_thd(lse, cu_q, tq):
    """flash-attn's lse, [H, Tq] (or [B, H, max_q] in old releases) -> fp32 [Tq, H]; empty rows -inf."""
    if lse.dim() == 3:
        cq = cu_q.tolist()
        lse = torch.cat([lse[b, :, : cq[b + 1] - cq[b]] for b in range(len(cq) - 1)], dim=1)
    lse = lse[:, :tq].transpose(0, 1).float()
    return torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse)


def flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_q, pos_k, return_lse):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D] (fp16/bf16, CUDA) -> out [Tq, Hq, D] or (out, lse fp32 [Tq, Hq])."""
    fn = _import()
    if q.device.type != "cuda":
        raise RuntimeError(f"backend='flash_attn' needs CUDA tensors, got device {q.device}")
    _check_positions(pos_q, cu_q, q.shape[0], "q")
    _check_positions(pos_k, cu_k, k.shape[0], "k")
    if causal and not torch.equal(cu_q, cu_k):
        raise ValueError("backend='flash_attn' needs cu_seqlens_q == cu_seqlens_k for causal attention "
                         "(its causal mask is bottom-right aligned); use backend='triton' or 'torch'")
    res = fn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, dropout_p=0.0,
             softmax_scale=scale, causal=causal, return_attn_probs=return_lse)
    if not return_lse:
        return res
    out, lse = res[0], res[1]
    return out, _lse_thd(lse.detach(), cu_q, q.shape[0])
