"""Attention kernels behind one dispatch API.

    attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
              causal=True, softmax_scale=None, pos_q=None, pos_k=None,
              backend="auto", return_lse=False, uniform=False, tables=None)

Packed THD shapes: q [Tq, Hq, D]; k, v [Tk, Hkv, D] with Hq % Hkv == 0 (q head h reads kv head
h // (Hq // Hkv)); cu_seqlens_* int32 [num_docs + 1] from 0, the same number of documents on both
sides (document i of q attends only document i of k; either side may be empty). pos_q / pos_k:
int32 [Tq] / [Tk] true positions within each document, None = 0, 1, 2, ... from each document's
start. Causal: a query sees a key of its document iff pos_k <= pos_q. softmax_scale: default
1/sqrt(D). Returns out [Tq, Hq, D] in q.dtype, or (out, lse) with lse fp32 [Tq, Hq], the natural
log-sum-exp of the scaled visible scores. Rows that see no key: out 0, lse -inf, zero gradients.
Differentiable through q, k, v; NOT through lse (it is returned detached). uniform: the caller
knows that every document of q and of k has max_seqlen_q == max_seqlen_k tokens (a plain [B, S]
batch); the torch backend then needs no host read of cu_seqlens and stays inside a torch.compile
graph. The other backends read cu_seqlens on the host (checks) and run outside any
compiled graph (a graph break), as does the torch backend without ``uniform``.
tables: a ``BlockTables`` shared by every call over the same batch (a model's layers): the
Triton backend builds its block tables there once instead of per call; other backends ignore it.

Backends: "triton" (loom.kernels.flash_attn), "flash_attn" (the flash-attn package, CUDA, default
positions only), "torch" (SDPA; the reference math when lse is requested), "auto" = triton on
CUDA, torch elsewhere. Triton is imported lazily, on first use of the triton backend.

Ring attention needs per-block forward/backward with LSE: ``block_ops(backend, device)`` returns
the (forward, backward) pair, loom.kernels.flash_attn's for triton and loom.kernels.reference's for torch:
    forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, pos_q, pos_k, tables=None) -> (out, lse)
    backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, pos_q, pos_k, tables=None)
        -> (dq, dk, dv)
where backward uses the GIVEN out/lse (the globally merged ones under ring attention).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from loom.kernels import reference
from loom.kernels._flash_shim import is_available as flash_attn_available
from loom.kernels.block_table import BlockTables

BACKENDS = ("auto", "triton", "flash_attn", "torch")


class AttentionOps(NamedTuple):
    """A matched forward/backward pair of block kernels (signatures in the module docstring)."""

    forward: Callable
    backward: Callable


def resolve_backend(backend: str, device) -> str:
    """Map "auto" to a concrete backend for ``device``; reject unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid values are {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return backend


def block_ops(backend: str = "auto", device="cpu") -> AttentionOps:
    """The per-block forward/backward pair that ring attention composes (see module docstring)."""
    name = resolve_backend(backend, device)
    if name == "triton":
        from loom.kernels import flash_attn
        return AttentionOps(flash_attn.flash_attn_forward, flash_attn.flash_attn_backward)
    if name == "torch":
        return AttentionOps(reference.attention_forward, reference.attention_backward)
    raise ValueError("backend='flash_attn' exposes no public block forward/backward with a given lse; "
                     "use 'triton' (CUDA) or 'torch' for ring attention")


def _validate(q, k, v, cu_q, cu_k, pos_q, pos_k):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [Tq, Hq, D], k and v [Tk, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}, and head dims must match")
    if cu_q.numel() != cu_k.numel() or cu_q.dim() != 1:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be 1-D with the same number of documents; "
                         f"got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    for pos, x, side in ((pos_q, q, "q"), (pos_k, k, "k")):
        if pos is not None and pos.shape != (x.shape[0],):
            raise ValueError(f"pos_{side} must have shape [{x.shape[0]}], got {tuple(pos.shape)}")


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True,
              softmax_scale=None, pos_q=None, pos_k=None, backend="auto", return_lse=False, uniform=False,
              tables=None):
    """Varlen attention over packed documents; see the module docstring for shapes and semantics."""
    name = resolve_backend(backend, q.device)
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, pos_q, pos_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if name == "torch" and not return_lse:
        from loom.kernels.sdpa import sdpa_attention
        equal = uniform and max_seqlen_q == max_seqlen_k and max_seqlen_q > 0
        return sdpa_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, pos_q, pos_k,
                              uniform_len=max_seqlen_q if equal else None)
    return _eager_kernel(name, args, causal, scale, pos_q, pos_k, return_lse, tables)


@torch.compiler.disable
def _eager_kernel(name, args, causal, scale, pos_q, pos_k, return_lse, tables=None):
    if name == "torch":
        return reference.attention(*args, causal=causal, softmax_scale=scale, pos_q=pos_q, pos_k=pos_k,
                                   return_lse=True)
    if name == "flash_attn":
        from loom.kernels._flash_shim import flash_attn_varlen
        return flash_attn_varlen(*args, causal, scale, pos_q, pos_k, return_lse)
    from loom.kernels.flash_attn import flash_attn_func
    out, lse = flash_attn_func(*args, causal=causal, softmax_scale=scale, pos_q=pos_q, pos_k=pos_k, tables=tables)
    return (out, lse) if return_lse else out


__all__ = ["attention", "block_ops", "resolve_backend", "AttentionOps", "BACKENDS", "BlockTables",
           "flash_attn_available"]
