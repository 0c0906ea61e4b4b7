"""The native-resolution vision tower of Qwen2.5-VL, its patch merger, and M-RoPE positions.

Single-device code: no process groups. An image of any size is ``t x h x w`` patches of
``[3, temporal_patch_size, p, p]`` pixels (an image is one temporal patch, its frame repeated; a
video pairs consecutive frames), flattened by the processor in merge-block order: the
``spatial_merge_size^2`` patches that become one LLM token are consecutive. The blocks are the
decoder's ``DecoderBlock`` / ``Attention`` (bidirectional, biased, SwiGLU with biases), so TP
shards them like any ViT block, and attention is the packed varlen path: each frame of each
image or video is one document (``cu_seqlens``) in the full-attention blocks, and each window of
``window_size`` pixels a side one document in the others. Windows need their patches contiguous,
so the tower reorders patches by window on the way in (as HF does) and back on the way out.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.config import VisionConfig
from loom.model.layers import Attention, DecoderBlock, PackedMeta, RMSNorm, SwiGLU
from loom.model.surface import REPLICATED, Surface
from loom.model.vision import GeluMLP


def qwen_block(cfg: VisionConfig, backend: str) -> DecoderBlock:
    """Qwen2.5-VL: RMSNorm and a biased SwiGLU; Qwen3-VL: LayerNorm and a tanh-GELU MLP."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_heads, head_dim, bias=True, backend=backend, o_bias=True)
    attn.core.causal = False
    if cfg.arch == "qwen2_5_vl":
        return DecoderBlock(attn, SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True), cfg.hidden_size, cfg.eps)
    block = DecoderBlock(attn, GeluMLP(cfg.hidden_size, cfg.intermediate_size, "gelu"), cfg.hidden_size, cfg.eps)
    block.attn_norm, block.mlp_norm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.eps) for _ in range(2))
    return block


def check_grid(pixel_values: torch.Tensor, grid_thw: torch.Tensor, cfg: VisionConfig, name: str = "pixel_values"):
    width = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    if grid_thw is None or grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"{name} needs its grid_thw, int [num_items, 3] (temporal, height, width patches)")
    if pixel_values.dim() != 2 or pixel_values.shape[1] != width:
        raise ValueError(f"{name} must be flattened patches [num_patches, 3*{cfg.temporal_patch_size}*"
                         f"{cfg.patch_size}^2={width}] (model.vision.temporal_patch_size, patch_size), "
                         f"got {tuple(pixel_values.shape)}")
    total = int(grid_thw.prod(-1).sum())
    if pixel_values.shape[0] != total:
        raise ValueError(f"{name} has {pixel_values.shape[0]} patches but its grid_thw {grid_thw.tolist()} "
                         f"makes {total}")
    m = cfg.spatial_merge_size
    if bool((grid_thw[:, 1:] % m).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()}: heights and widths must be multiples of "
                         f"model.vision.spatial_merge_size={m}")


def patch_positions(grid_thw: torch.Tensor, merge: int, device) -> torch.Tensor:
    """int64 ``[patches, 2]``: each patch's (row, column) in its frame, in merge-block order."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hw = torch.stack([rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()],
                         dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_order(grid_thw: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(merge-unit order that makes each window contiguous ``[units]``, window borders ``cu [windows+1]`` in patches).

    A window is ``window_size // (patch_size * merge)`` merged tokens a side, laid from each frame's
    top-left corner; border windows are smaller, empty ones are dropped.
    """
    m = cfg.spatial_merge_size
    side = cfg.window_size // m // cfg.patch_size
    order, sizes, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // m, w // m
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = -gh % side, -gw % side
        padded = F.pad(index, (0, pw, 0, ph), value=-1)
        nh, nw = (gh + ph) // side, (gw + pw) // side
        windows = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
        keep = windows >= 0
        order.append(windows[keep] + offset)
        sizes.append(keep.sum(1))
        offset += t * gh * gw
    sizes = torch.cat(sizes)
    sizes = sizes[sizes > 0] * m * m
    cu = F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(order), cu


def resized_positions(grid_thw: torch.Tensor, side: int, merge: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows into a ``side x side`` table ``[patches, 4]``, weights ``[patches, 4]``): the table bilinearly resized
    (corners aligned) to each frame's grid, per patch in merge-block order, as Qwen3-VL reads its learned positions."""
    pos = patch_positions(grid_thw, merge, device)
    counts = grid_thw.prod(-1).to(device)
    size = [torch.repeat_interleave(grid_thw[:, k].to(device), counts) for k in (1, 2)]
    taps, weights = [], []
    for axis in (0, 1):
        src = pos[:, axis].to(torch.float32) * (side - 1) / torch.clamp(size[axis] - 1, min=1)
        floor = torch.floor(src)
        offsets = torch.arange(0, 2, device=device)
        taps.append((floor.long()[:, None] + offsets).clamp(0, side - 1))
        weights.append((1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0))
    index = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, 4)
    return index, (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, 4)


def frame_borders(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 ``[frames+1]``: every temporal patch of every image or video is one attention document."""
    sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)


class QwenVisionTower(nn.Module):
    """pixel_values ``[patches, 3*tp*p*p]`` + grid_thw ``[N, 3]`` -> features ``[patches, vision.hidden_size]``,
    in the input's (merge-block) order; the PatchMerger turns each merge block into one LLM token.

    The patch embedding is a Linear over flattened patches: HF's Conv3d with kernel = stride = the
    patch is the same math, its weight ``conv.weight.reshape(out, -1)``.
    """

    def __init__(self, cfg: VisionConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        qwen3 = cfg.arch == "qwen3_vl"
        self.patch_embed = nn.Linear(3 * cfg.temporal_patch_size * cfg.patch_size ** 2, cfg.hidden_size, bias=qwen3)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size) if qwen3 else None
        self.layers = nn.ModuleDict({str(i): qwen_block(cfg, backend) for i in range(cfg.num_layers)})

    def surface(self) -> Surface:
        return Surface(blocks="layers", adapters={"layers": "vision"})

    def unused_parameters(self) -> list[nn.Parameter]:
        return []

    def rotary(self, grid_thw: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin ``[patches, head_dim]``: the first half of each half-head turns with the row, the rest
        with the column (HF's axial layout)."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        quarter = torch.arange(0, head_dim // 2, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.cfg.rope_theta ** (quarter / (head_dim // 2)))
        pos = patch_positions(grid_thw, self.cfg.spatial_merge_size, device).to(torch.float32)
        freqs = (pos.unsqueeze(-1) * inv_freq).flatten(1)  # [patches, head_dim/2]: rows' then columns'
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values, grid_thw)[0]

    def features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the last block's output, the outputs of ``deepstack_visual_indexes``' blocks), in the input's order."""
        cfg = self.cfg
        check_grid(pixel_values, grid_thw, cfg)
        grid_thw = grid_thw.cpu().long()
        device, unit = pixel_values.device, cfg.spatial_merge_size ** 2
        h = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        if self.pos_embed is not None:
            index, weight = resized_positions(grid_thw, math.isqrt(cfg.num_position_embeddings),
                                              cfg.spatial_merge_size, device)
            h = h + (self.pos_embed(index) * weight.unsqueeze(-1)).sum(1).to(h.dtype)
        cos, sin = self.rotary(grid_thw, device)
        cu_frames = frame_borders(grid_thw)
        metas = {True: PackedMeta(cu_frames.to(device), int((cu_frames[1:] - cu_frames[:-1]).max()), cos, sin)}
        perm = None
        if cfg.arch == "qwen2_5_vl":
            units, cu_windows = window_order(grid_thw, cfg)
            # Patch permutation: each merge unit moves as a whole, so merge blocks stay contiguous.
            perm = (units.unsqueeze(1) * unit + torch.arange(unit)).flatten().to(device)
            h, cos, sin = h[perm], cos[perm], sin[perm]
            # Windows never cross a frame, so the frame borders hold in window order too.
            metas = {full: PackedMeta(cu.to(device), int((cu[1:] - cu[:-1]).max()), cos, sin)
                     for full, cu in ((True, cu_frames), (False, cu_windows))}
        taps = {}
        for i, layer in self.layers.items():
            h = layer(h, metas[perm is None or int(i) in cfg.fullatt_block_indexes])
            taps[int(i)] = h
        taps = [taps[i] for i in cfg.deepstack_visual_indexes]
        if perm is not None:
            back = torch.argsort(perm)
            h, taps = h[back], [t[back] for t in taps]
        return h, taps


class PatchMerger(nn.Module):
    """A norm, each ``merge^2`` consecutive patch features concatenated, then Linear-GELU-Linear to the LLM width.

    Qwen2.5-VL's merger (RMSNorm per patch) is Loom's projector; Qwen3-VL's uses LayerNorm, and its
    DeepStack mergers (``deepstack``, one per tapped block) norm after concatenating.
    """

    def __init__(self, cfg: VisionConfig, llm_hidden: int, after_concat: bool = False):
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        normed = width if after_concat else cfg.hidden_size
        self.norm = RMSNorm(normed, 1e-6) if cfg.arch == "qwen2_5_vl" else nn.LayerNorm(normed, eps=1e-6)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, llm_hidden)
        self.width, self.after_concat = width, after_concat
        if cfg.deepstack_visual_indexes and not after_concat:
            self.deepstack = nn.ModuleList([PatchMerger(cfg, llm_hidden, True) for _ in cfg.deepstack_visual_indexes])

    def surface(self) -> Surface:  # small, and run on whole images: every rank holds it whole
        return Surface(projections={"fc1": REPLICATED, "fc2": REPLICATED},
                       adapters={"fc1": "projector", "fc2": "projector"})

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[patches, C]`` -> ``[patches / merge^2, llm_hidden]``."""
        x = self.norm(feats.reshape(-1, self.width)) if self.after_concat else self.norm(feats).reshape(-1, self.width)
        return self.fc2(F.gelu(self.fc1(x)))


def merged_tokens(grid_thw: Optional[torch.Tensor], merge: int) -> int:
    """LLM tokens of the images (or videos) of ``grid_thw``."""
    return 0 if grid_thw is None else int(grid_thw.prod(-1).sum()) // merge ** 2
