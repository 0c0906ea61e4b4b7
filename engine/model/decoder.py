"""The dense decoder-only language model (Llama / Qwen family), built from ``ModelConfig``.

Blocks live in a ``ModuleDict`` keyed by global layer index, so a pipeline stage can drop the
ones it does not own while parameter names (and checkpoints, and HF mappings) stay stable.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig
from engine.model.layers import Attention, DecoderBlock, PackedMeta, RMSNorm, SwiGLU, rope_tables
from engine.model.moe import GroupedExperts, MoE, Router


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``[T]`` int32 positions counting from 0 at each document start."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return (torch.arange(total, device=cu_seqlens.device) - starts.repeat_interleave(lengths, output_size=total)).int()


def build_mlp(cfg: ModelConfig, i: int) -> nn.Module:
    """Layer ``i``'s MLP: dense SwiGLU, or MoE where ``cfg.is_moe_layer(i)``."""
    if not cfg.is_moe_layer(i):
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
    return MoE(cfg.hidden_size, cfg.moe, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.resolved_head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({
            str(i): DecoderBlock(
                Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, hd, bias=cfg.attention_bias,
                          qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps, backend=cfg.attn_backend),
                build_mlp(cfg, i),
                cfg.hidden_size, cfg.rms_norm_eps,
            )
            for i in range(cfg.num_layers)
        })
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (Router, GroupedExperts)):
                module.reset_parameters(std)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
                attn_positions: Optional[torch.Tensor] = None, attn_extra: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None, skip_lm_head: bool = False) -> torch.Tensor:
        """Logits for packed ``input_ids [T]`` -> ``[T, V]``, or for a batch ``[B, S]`` -> ``[B, S, V]``.

        Packed input takes ``cu_seqlens`` (int32 ``[docs+1]``; default: one document) and
        ``positions`` (default: counting from each document's start). ``attn_positions`` are
        handed to the attention kernel when a shard's positions are not contiguous (CP), and
        ``attn_extra`` to whatever wraps attention (see PackedMeta).
        Under tensor parallelism V is this rank's vocabulary slice.

        A pipeline stage lacks what it does not own (torchtitan style): without ``embed`` the
        input is the hidden states ``[T, h]`` from the previous stage, and without ``lm_head``
        the output is the hidden states for the next one. ``inputs_embeds`` (``[*input_ids.shape, h]``)
        replaces the embedding lookup (a VLM splices image features into it first).
        ``skip_lm_head`` returns the final-normed hidden states ``[..., h]`` instead of logits, for
        a loss that applies the head itself (engine/train/loss.py).
        """
        batch_shape = input_ids.shape if self.embed is not None else input_ids.shape[:-1]
        batched = len(batch_shape) == 2
        total = int(torch.tensor(batch_shape).prod())
        ids = input_ids.reshape(total, *input_ids.shape[len(batch_shape):])
        if batched:
            seq = batch_shape[1]
            cu_seqlens = torch.arange(0, total + 1, seq, dtype=torch.int32, device=ids.device)
            max_seqlen = seq
        elif cu_seqlens is None:
            cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=ids.device)
            max_seqlen = total
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, total)
        if inputs_embeds is not None:
            h = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
        else:
            h = self.embed(ids) if self.embed is not None else ids
        cos, sin = rope_tables(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta, h.dtype)
        meta = PackedMeta(cu_seqlens, max_seqlen, cos, sin, attn_positions, attn_extra)
        for layer in self.layers.values():
            h = layer(h, meta)
        if self.lm_head is None:
            return h
        out = self.norm(h) if skip_lm_head else self.lm_head(self.norm(h))
        return out.view(*batch_shape, -1) if batched else out


def build_model(cfg: ModelConfig, device=None) -> Transformer:
    """Build on ``device`` with the current torch RNG state (seed it for identical weights)."""
    model = Transformer(cfg)
    return model.to(device) if device is not None else model
