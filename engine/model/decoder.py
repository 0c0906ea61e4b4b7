"""The dense decoder-only language model (Llama / Qwen family), built from ``ModelConfig``.

Blocks live in a ``ModuleDict`` keyed by global layer index, so a pipeline stage can drop the
ones it does not own while parameter names (and checkpoints, and HF mappings) stay stable.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from loom.config import ModelConfig
from loom.model.batch import PackedBatch, check_hf_inputs, one_input, pack_rows, unpack_rows
from loom.model.compile import mark_layout_dynamic
from loom.model.layers import Attention, DecoderBlock, PackedMeta, RMSNorm, SwiGLU, mrope_tables, rope_tables
from loom.model.init import initialize_full, seed_from_rng
from loom.model.moe import MoE, MoEWiring
from loom.model.surface import HEAD, VOCAB, Surface


def build_mlp(cfg: ModelConfig, i: int, wiring: Optional[MoEWiring] = None) -> nn.Module:
    """Layer ``i``'s MLP: dense SwiGLU, or MoE where ``cfg.is_moe_layer(i)`` (wired by ``wiring``)."""
    if not cfg.is_moe_layer(i):
        return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
    wiring = wiring or MoEWiring()
    return MoE(cfg.hidden_size, cfg.moe, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
               dispatcher=wiring.dispatcher(i), scope=wiring.scope)


class Transformer(nn.Module):
    """Built on the meta device (``with torch.device("meta")``) it allocates nothing: the trainer
    parallelizes it there and fills each rank's shards (engine/model/init.py). Built on a real
    device it starts from weights drawn with the current torch RNG state (unless ``initialize``
    is false: a VLM initialises its whole self at once). ``wiring``: how its MoE layers reach experts
    and balancing statistics on other ranks (default: one device)."""

    def __init__(self, cfg: ModelConfig, initialize: bool = True, wiring: Optional[MoEWiring] = None):
        super().__init__()
        self.cfg = cfg
        hd = cfg.resolved_head_dim
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({
            str(i): DecoderBlock(
                Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, hd, bias=cfg.attention_bias,
                          qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps, backend=cfg.attn_backend),
                build_mlp(cfg, i, wiring),
                cfg.hidden_size, cfg.rms_norm_eps,
            )
            for i in range(cfg.num_layers)
        })
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if initialize and not self.embed.weight.is_meta:
            initialize_full(self, seed_from_rng(), cfg.init_std)

    def surface(self) -> Surface:
        return Surface(projections={"embed": VOCAB, "lm_head": HEAD}, sequence_norms=("norm",), blocks="layers",
                       first=("embed",), last=("norm", "lm_head"),
                       ties=(("lm_head", "embed"),) if self.cfg.tie_embeddings else ())

    def hidden_states(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, h]`` after the final norm: what the fused LM head loss takes (engine/train/loss.py).

        A pipeline stage lacks what it does not own (torchtitan style): without ``embed`` it takes
        ``batch.hidden`` from the previous stage, and without ``norm`` (any stage but the last) it
        returns its blocks' output for the next one. Under sequence parallelism ``T`` is this
        rank's slice of the tokens.
        """
        h = self._first_hidden(batch)
        meta = self._meta(batch, h.dtype)
        extra = batch.deepstack or ()
        for i, layer in self.layers.items():
            h = layer(h, meta)
            if int(i) < len(extra):  # DeepStack (Qwen3-VL): vision features join after the first layers
                h = h + extra[int(i)].to(h.dtype)
        return self.norm(h) if self.norm is not None else h

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, V]``; under tensor parallelism V is this rank's vocabulary slice."""
        if self.lm_head is None:
            raise ValueError("this pipeline stage has no LM head: its output is hidden_states()")
        return self.lm_head(self.hidden_states(batch))

    def forward(self, batch: PackedBatch | torch.Tensor | None = None, attention_mask: Optional[torch.Tensor] = None,
                *, input_ids: Optional[torch.Tensor] = None, **hf_inputs) -> torch.Tensor:
        """Logits of a PackedBatch ``[T, V]``, or of token ids ``[B, S] -> [B, S, V]`` (``[T]``: one document).

        Token ids also come as transformers passes them, ``model(**tokenizer(...))``: ``input_ids=`` and
        ``attention_mask`` [B, S] (1: token, 0: padding), which makes each row one document of its
        unmasked tokens; padded positions get zero logits. See ``check_hf_inputs`` for the other keys.
        """
        batch = one_input(batch, input_ids)
        if isinstance(batch, PackedBatch):
            if attention_mask is not None or hf_inputs:
                raise ValueError("a PackedBatch carries its own document borders: pass no attention_mask")
            return self.logits(batch)
        check_hf_inputs(batch, hf_inputs, {})
        packed, keep = pack_rows(batch, attention_mask)
        return unpack_rows(self.logits(packed), keep, batch.shape)

    def _first_hidden(self, batch: PackedBatch) -> torch.Tensor:
        if batch.hidden is not None:
            return batch.hidden
        if self.embed is None:
            raise ValueError("a pipeline stage without the embedding takes hidden states (PackedBatch.hidden)")
        return self.embed(batch.input_ids)

    def _meta(self, batch: PackedBatch, dtype: torch.dtype) -> PackedMeta:
        cu_seqlens, max_seqlen, positions = batch.layout()
        if positions.dim() == 2:  # [3, T]: M-RoPE (temporal, height, width)
            if self.cfg.mrope_section is None:
                raise ValueError(f"positions of shape {tuple(positions.shape)} are M-RoPE positions, but "
                                 "model.mrope_section is null")
            cos, sin = mrope_tables(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta,
                                    self.cfg.mrope_section, dtype, self.cfg.mrope_interleaved)
        else:
            cos, sin = rope_tables(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta, dtype)
        # Read once here rather than by every layer's attention (and outside compiled blocks).
        uniform = max_seqlen > 0 and max_seqlen * (cu_seqlens.numel() - 1) == int(cu_seqlens[-1])
        mark_layout_dynamic(cu_seqlens)
        return PackedMeta(cu_seqlens, max_seqlen, cos, sin, batch.attn, uniform=uniform)


def build_model(cfg: ModelConfig, device=None, wiring: Optional[MoEWiring] = None) -> Transformer:
    """Build on ``device`` with the current torch RNG state (seed it for identical weights)."""
    model = Transformer(cfg, wiring=wiring)
    return model.to(device) if device is not None else model
