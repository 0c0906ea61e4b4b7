"""A ViT image encoder (CLIP / SigLIP family) and the projector into the LLM's embedding space.

Single-device code: no process groups. The blocks are the decoder's ``DecoderBlock`` and
``Attention`` (bidirectional, no RoPE), so tensor parallelism shards them with the same helpers
as the LLM. Every image is one packed "document" (``cu_seqlens`` over images): attention stays
inside an image, and images of different sizes could share one varlen call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import VisionConfig
from engine.model.layers import Attention, DecoderBlock, PackedMeta, RMSNorm, SwiGLU


class GeluMLP(nn.Module):
    """``fc2(gelu(fc1(x)))`` with biases, as in CLIP / SigLIP (the names follow them)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _norm(cfg: VisionConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.eps) if cfg.norm == "layernorm" else RMSNorm(cfg.hidden_size, cfg.eps)


def vision_block(cfg: VisionConfig, backend: str) -> DecoderBlock:
    """A pre-norm ViT block: the decoder block with bidirectional, position-free attention."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, head_dim, bias=True, backend=backend)
    attn.core.causal = False
    mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size) if cfg.mlp == "gelu" else \
        SwiGLU(cfg.hidden_size, cfg.intermediate_size)
    block = DecoderBlock(attn, mlp, cfg.hidden_size, cfg.eps)
    block.attn_norm, block.mlp_norm = _norm(cfg), _norm(cfg)
    return block


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, (H/p)*(W/p), C*p*p]``, patches in row-major order."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class VisionEncoder(nn.Module):
    """pixel_values ``[N, 3, S, S]`` -> patch features ``[N, (S/p)^2, vision.hidden_size]``.

    The patch embedding is a Linear over flattened patches (same math as a stride-p Conv2d),
    so it is an ordinary linear for sharding and checkpoint mapping.
    """

    def __init__(self, cfg: VisionConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, cfg.hidden_size))
        self.layers = nn.ModuleDict({str(i): vision_block(cfg, backend) for i in range(cfg.num_layers)})
        self.norm = _norm(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [num_images, 3, {size}, {size}] (model.vision.image_size), "
                             f"got {tuple(pixel_values.shape)}")
        n, p = pixel_values.shape[0], self.pos_embed.shape[0]
        h = self.patch_embed(patchify(pixel_values, self.cfg.patch_size).to(self.patch_embed.weight.dtype))
        h = (h + self.pos_embed).reshape(n * p, -1)
        # One document per image: attention never crosses an image border.
        cu = torch.arange(0, n * p + 1, p, dtype=torch.int32, device=h.device)
        meta = PackedMeta(cu, p, None, None)
        for layer in self.layers.values():
            h = layer(h, meta)
        return self.norm(h).reshape(n, p, -1)


def merge_2x2(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``[N, g*g, C]`` -> ``[N, (g/2)^2, 4C]``: each 2x2 block of neighbouring patches becomes one token."""
    n, _, c = x.shape
    x = x.reshape(n, grid // 2, 2, grid // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (grid // 2) ** 2, 4 * c)


class Projector(nn.Module):
    """Linear-GELU-Linear from vision features (optionally 2x2-merged) to the LLM hidden size."""

    def __init__(self, cfg: VisionConfig, llm_hidden: int):
        super().__init__()
        self.grid, self.merge = cfg.image_size // cfg.patch_size, cfg.merge
        in_features = cfg.hidden_size * (4 if cfg.merge else 1)
        self.fc1 = nn.Linear(in_features, llm_hidden)
        self.fc2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N, g*g, C]`` -> ``[N, tokens_per_image, llm_hidden]``."""
        if self.merge:
            feats = merge_2x2(feats, self.grid)
        return self.fc2(F.gelu(self.fc1(feats)))
