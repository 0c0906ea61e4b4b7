"""Decoder building blocks for the Llama / Qwen family. Single-device code: no process groups.

Activations are packed (THD): ``[T, hidden]`` with ``cu_seqlens`` marking documents.
Tensor parallelism replaces the linears from outside (engine/parallel/parallelize.py); the code
here reads the local head count from the projection's output size, so it never needs to know.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom import kernels
from loom.model.batch import AttnContext
from loom.model.surface import COLUMN, ROW, Surface


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one op: the same math, fewer passes
        return self.weight * x.to(dtype)


@dataclass
class PackedMeta:
    """What the blocks see of a packed batch, derived once per forward.

    ``cos``/``sin``: ``[T, head_dim]`` rotary tables at each token's true position (None: no rotary).
    ``attn``: the batch's attention context (``PackedBatch.attn``), which a parallel wrapper of
    attention may have extended.
    ``uniform``: every document has ``max_seqlen`` tokens (a plain ``[B, S]`` batch, a ViT's images):
    attention then needs no host read of ``cu_seqlens``, and stays inside a compiled graph.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]
    attn: AttnContext = field(default_factory=AttnContext)
    uniform: bool = False


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[T, head_dim]`` in HF's rotate-half layout (halves, not interleaved pairs)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_axes(sections, interleaved: bool, device=None) -> torch.Tensor:
    """int64 ``[head_dim/2]``: the axis (0 temporal, 1 height, 2 width) each rotary frequency turns with.

    Blocks (Qwen2-VL): ``sections[0]`` temporal, then height, then width. Interleaved (Qwen3-VL):
    frequency j is height when j % 3 == 1 and j < 3*sections[1], width when j % 3 == 2 and
    j < 3*sections[2], temporal otherwise.
    """
    half = sum(sections)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(list(sections), device=device),
                                       output_size=half)
    axis = torch.zeros(half, dtype=torch.long, device=device)
    for a in (1, 2):
        axis[a:3 * sections[a]:3] = a
    return axis


def mrope_tables(positions: torch.Tensor, head_dim: int, theta: float, sections, dtype, interleaved: bool = False):
    """Multimodal rotary tables (Qwen-VL M-RoPE): ``positions`` int ``[3, T]`` (temporal, height, width).

    The head_dim/2 frequencies split into ``sections`` (temporal, height, width sizes, summing to
    head_dim/2; see ``mrope_axes``); frequency j turns with the position on its axis. A text token
    has the same position on all three axes, so for text this is ordinary RoPE.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    axis = mrope_axes(sections, interleaved, positions.device)
    chosen = positions.to(torch.float32)[axis]  # [head_dim/2, T]: each frequency's axis position
    freqs = chosen.t() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: ``[T, heads, head_dim]``; cos/sin: ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # Autocast may hand fp32 tables to bf16 activations; keep the activation dtype.
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


class CoreAttention(nn.Module):
    """Causal attention over packed documents through the kernels' dispatch API.

    q: ``[T, Hq, D]``, k/v: ``[T, Hkv, D]`` -> ``[T, Hq, D]``. Context parallelism swaps this
    module for its ring / Ulysses version; nothing else in the model changes.
    """

    def __init__(self, backend: str = "auto", causal: bool = True):
        super().__init__()
        self.backend, self.causal = backend, causal

    def surface(self) -> Surface:
        return Surface(recompute=("forward",))  # selective recompute keeps q/k/v, drops the scores' work

    def forward(self, q, k, v, meta: PackedMeta) -> torch.Tensor:
        return kernels.attention(
            q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
            causal=self.causal, pos_q=meta.attn.positions, pos_k=meta.attn.positions, backend=self.backend,
            uniform=meta.uniform, tables=meta.attn.tables,
        )


class Attention(nn.Module):
    """GQA self-attention with RoPE and optional q/k-norm (Qwen3) and q/k/v bias (Qwen2)."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, bias: bool = False,
                 qk_norm: bool = False, eps: float = 1e-6, backend: str = "auto", o_bias: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.core = CoreAttention(backend)

    def surface(self) -> Surface:
        return Surface(projections={"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "o_proj": ROW},
                       adapters={n: n for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                       head_norms=("q_norm", "k_norm"), attention_core="core", cache=("kv",))

    def forward(self, x: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (-1, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (-1, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if meta.cos is not None:  # None: no rotary positions (a ViT adds learned ones to its input)
            q, k = apply_rope(q, meta.cos, meta.sin), apply_rope(k, meta.cos, meta.sin)
        out = self.core(q, k, v, meta)
        return self.o_proj(out.flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def surface(self) -> Surface:
        return Surface(projections={"gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW},
                       adapters={n: n for n in ("gate_proj", "up_proj", "down_proj")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``."""

    def __init__(self, attn: Attention, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def surface(self) -> Surface:
        return Surface(sequence_norms=("attn_norm", "mlp_norm"))

    def forward(self, h: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), meta)
        if getattr(self.mlp, "takes_meta", False):  # MoE: its balancing losses need the token layout
            return h + self.mlp(self.mlp_norm(h), meta)
        return h + self.mlp(self.mlp_norm(h))
