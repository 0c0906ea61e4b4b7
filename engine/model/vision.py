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

from loom.config import VisionConfig
from loom.model.init import Init, normal
from loom.model.layers import Attention, DecoderBlock, PackedMeta, RMSNorm, SwiGLU
from loom.model.surface import COLUMN, REPLICATED, ROW, Surface


class GeluMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with biases, as in CLIP / SigLIP (the names follow them).

    ``act``: ``gelu`` is the tanh approximation (SigLIP's gelu_pytorch_tanh), ``quick_gelu`` CLIP's
    ``x * sigmoid(1.702 x)``; a checkpoint trained with one is a different model under the other.
    """

    def __init__(self, hidden: int, intermediate: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.act = act

    def surface(self) -> Surface:
        return Surface(projections={"fc1": COLUMN, "fc2": ROW}, adapters={"fc1": "fc1", "fc2": "fc2"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x, approximate="tanh")
        return self.fc2(x)


def _norm(cfg: VisionConfig) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.eps) if cfg.norm == "layernorm" else RMSNorm(cfg.hidden_size, cfg.eps)


def vision_block(cfg: VisionConfig, backend: str) -> DecoderBlock:
    """A pre-norm ViT block: the decoder block with bidirectional, position-free attention."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, head_dim, bias=True, backend=backend,
                     o_bias=cfg.o_bias)
    attn.core.causal = False
    mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size) if cfg.mlp == "swiglu" else \
        GeluMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp)
    block = DecoderBlock(attn, mlp, cfg.hidden_size, cfg.eps)
    block.attn_norm, block.mlp_norm = _norm(cfg), _norm(cfg)
    return block


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, (H/p)*(W/p), C*p*p]``, patches in row-major order."""
    n, c, h, w = pixel_values.shape
    x = pixel_values.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // patch) * (w // patch), c * patch * patch)


class VisionEncoder(nn.Module):
    """pixel_values ``[N, 3, S, S]`` -> patch features ``[N, tokens, vision.hidden_size]``.

    The patch embedding is a Linear over flattened patches (same math as a stride-p Conv2d: its
    weight is ``conv.weight.reshape(out, -1)``), so it is an ordinary linear for sharding and
    checkpoint mapping. CLIP as LLaVA uses it adds a class token and a norm before the blocks,
    and reads the penultimate block's output without the final norm (``feature_layer=-2``,
    ``post_norm=false``); the unused blocks and norm stay, so a checkpoint converts bit for bit.
    """

    def __init__(self, cfg: VisionConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.hidden_size, bias=cfg.patch_bias)
        self.class_embed = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid + int(cfg.class_token), cfg.hidden_size))
        self.pre_norm = _norm(cfg) if cfg.pre_norm else None
        self.layers = nn.ModuleDict({str(i): vision_block(cfg, backend) for i in range(cfg.num_layers)})
        self.norm = _norm(cfg)

    def surface(self) -> Surface:
        return Surface(blocks="layers", adapters={"layers": "vision"})

    def init_rules(self, std: float) -> dict:
        """Learned positions start as 2-D sine-cosine (MAE): from a small random start a tiny ViT learns
        where its patches are only slowly, and shapes (unlike colours) need it. The class token and
        its position, which have no grid place, start N(0, std)."""
        return {"pos_embed": Init("table", table=self._initial_positions(std)), "class_embed": normal(std)}

    def _initial_positions(self, std: float):
        cfg, rows = self.cfg, self.pos_embed.shape[0]
        grid = cfg.image_size // cfg.patch_size

        def table(seed: int) -> torch.Tensor:
            out = torch.empty(rows, cfg.hidden_size)
            out[rows - grid * grid:] = sincos_2d(grid, cfg.hidden_size)
            if cfg.class_token:
                out[0] = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(seed)) * std
            return out
        return table

    def unused_parameters(self) -> list[nn.Parameter]:
        """Weights kept for conversion that the forward never reads: the blocks after
        ``feature_layer``, and the final norm without ``post_norm``."""
        modules = list(self.layers.values())[self.cfg.feature_blocks:]
        if not self.cfg.post_norm:
            modules.append(self.norm)
        return [p for m in modules for p in m.parameters()]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must be [num_images, 3, {size}, {size}] (model.vision.image_size), "
                             f"got {tuple(pixel_values.shape)}")
        n, p = pixel_values.shape[0], self.pos_embed.shape[0]
        h = self.patch_embed(patchify(pixel_values, self.cfg.patch_size).to(self.patch_embed.weight.dtype))
        if self.class_embed is not None:
            h = torch.cat([self.class_embed.to(h.dtype).expand(n, 1, -1), h], dim=1)
        h = (h + self.pos_embed).reshape(n * p, -1)
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        # One document per image: attention never crosses an image border.
        cu = torch.arange(0, n * p + 1, p, dtype=torch.int32, device=h.device)
        meta = PackedMeta(cu, p, None, None, uniform=True)
        for layer in list(self.layers.values())[:self.cfg.feature_blocks]:
            h = layer(h, meta)
        if self.cfg.post_norm:
            h = self.norm(h)
        h = h.reshape(n, p, -1)
        return h[:, 1:] if self.class_embed is not None and self.cfg.feature_select == "default" else h


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """``[grid*grid, dim]`` fixed 2-D sine-cosine positions (MAE): half the channels code the row, half the column."""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = [f(c.reshape(-1, 1) * freq) for c in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.zeros(grid * grid, dim, dtype=torch.float64)
    out[:, :4 * quarter] = torch.cat(parts, dim=1)
    return out.float()


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

    def surface(self) -> Surface:  # small, and run on whole images: every rank holds it whole
        return Surface(projections={"fc1": REPLICATED, "fc2": REPLICATED},
                       adapters={"fc1": "projector", "fc2": "projector"})

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N, g*g, C]`` -> ``[N, tokens_per_image, llm_hidden]``."""
        if self.merge:
            feats = merge_2x2(feats, self.grid)
        return self.fc2(F.gelu(self.fc1(feats)))
