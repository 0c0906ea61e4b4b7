"""QLoRA's frozen base (Dettmers et al. 2023): 4-bit NormalFloat weights, dequantised on the fly.

Plain torch, so it runs wherever the model does (CPU included).

Layout of one quantised weight ``W [*lead, n]`` (``[out, in]`` for a linear, ``[E, out, in]`` for stacked
experts): each row of ``n`` values is cut into blocks of ``block`` (64) along the last dim; a block
stores its absmax and, per value, the index of the nearest NF4 level to ``value / absmax``; two 4-bit
indices share a byte (the first in the high nibble, as bitsandbytes packs them). Blocks never cross a
row, so a shard by output rows or by expert quantises exactly as the whole tensor does, and a shard by
input (row-parallel TP) does when its width is a multiple of ``block`` (else its last block is short).
With ``in % block == 0`` this is bitsandbytes' flat block-wise layout.

Double quantisation (QLoRA's): the fp32 absmaxes, minus their mean, are themselves quantised to 8 bits
with bitsandbytes' signed dynamic map in blocks of 256, each block keeping one fp32 absmax. Per value:
4 bits + 8/64 bits + 32/(64*256) bits, about 0.516 bytes (0.258 of bf16); without it 0.5625 (0.281).

Backward never keeps a dequantised copy: ``_NF4Linear`` / ``_NF4GroupedMM`` save the packed weight and
dequantise it again to make the input's gradient; the base itself gets none.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.compat import grouped_mm
from loom.model import surface

# The NF4 levels as published with QLoRA (bitsandbytes' get_4bit_type("nf4")): equal-area quantiles of
# N(0, 1), normalised to [-1, 1], with an exact zero.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
SCALE_BLOCK = 256  # double quantisation's block of absmaxes


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted values in [-1, 1],
    a sign, a run of zero bits as the decimal exponent (down to 1e-6), then a linear fraction."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` for each element of ``x``."""
    return torch.bucketize(x.contiguous(), (code[1:] + code[:-1]) / 2).to(torch.uint8)


def _safe(absmax: torch.Tensor) -> torch.Tensor:
    """A divisor: an all-zero block's absmax (0) made tiny, so its values stay 0, not NaN."""
    return absmax.clamp_min(torch.finfo(torch.float32).tiny)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[*lead, n]`` -> ``[*lead, ceil(n / block), block]``, the last block of each row zero-padded."""
    pad = (-x.shape[-1]) % block
    return F.pad(x, (0, pad)).unflatten(-1, (-1, block))


class NF4Weight(nn.Module):
    """One frozen weight in NF4. Its buffers are not persistent: checkpoints do not hold the quantised
    base (it comes back from ``model.pretrained`` or the seeded initialisation, then is quantised again)."""

    def __init__(self, weight: torch.Tensor, block: int = 64, double_quant: bool = True):
        super().__init__()
        if weight.shape[-1] % 2:
            raise ValueError(f"NF4 packs two values a byte: weight shape {tuple(weight.shape)} has an odd last dim")
        self.shape, self.dtype, self.block, self.double_quant = tuple(weight.shape), weight.dtype, block, double_quant
        nblocks = -(-self.shape[-1] // block)
        if weight.is_meta:  # a dry run: the shapes of what a real run holds
            self._meta(nblocks)
            return
        blocks = _blocks(weight.detach().float(), block)
        absmax = blocks.abs().amax(-1)
        idx = _nearest(blocks / _safe(absmax).unsqueeze(-1), nf4_code(weight.device))
        idx = idx.flatten(-2)[..., :self.shape[-1]]
        self.register_buffer("codes", (idx[..., 0::2] << 4) | idx[..., 1::2], persistent=False)
        if double_quant:
            self._quantize_scales(absmax)
        else:
            self.register_buffer("absmax", absmax, persistent=False)

    def _meta(self, nblocks: int) -> None:
        lead, meta = self.shape[:-1], torch.device("meta")
        self.register_buffer("codes", torch.empty(*lead, self.shape[-1] // 2, dtype=torch.uint8, device=meta), False)
        if not self.double_quant:
            self.register_buffer("absmax", torch.empty(*lead, nblocks, device=meta), False)
            return
        n = nblocks
        for d in lead:
            n *= d
        self.register_buffer("absmax_codes", torch.empty(*lead, nblocks, dtype=torch.uint8, device=meta), False)
        self.register_buffer("absmax_scale", torch.empty(-(-n // SCALE_BLOCK), device=meta), False)
        self.register_buffer("absmax_offset", torch.empty((), device=meta), False)

    def _quantize_scales(self, absmax: torch.Tensor) -> None:
        offset = absmax.mean()
        blocks = _blocks((absmax - offset).reshape(-1), SCALE_BLOCK)
        scale = blocks.abs().amax(-1)
        codes = _nearest(blocks / _safe(scale).unsqueeze(-1), dynamic_code(absmax.device))
        self.register_buffer("absmax_codes", codes.reshape(-1)[:absmax.numel()].view(absmax.shape), persistent=False)
        self.register_buffer("absmax_scale", scale, persistent=False)
        self.register_buffer("absmax_offset", offset, persistent=False)

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block, ``[*lead, nblocks]``."""
        if not self.double_quant:
            return self.absmax
        codes = self.absmax_codes.reshape(-1)
        values = _blocks(dynamic_code(codes.device)[codes.long()], SCALE_BLOCK) * self.absmax_scale.unsqueeze(-1)
        return values.reshape(-1)[:codes.numel()].view(self.absmax_codes.shape) + self.absmax_offset

    def dequantize(self, dtype: Optional[torch.dtype] = None, index: Optional[int] = None) -> torch.Tensor:
        """The weight (``[index]`` of its first dim only, e.g. one expert), in ``dtype`` (default its own)."""
        codes, absmax = self.codes, self.scales()
        if index is not None:
            codes, absmax = codes[index], absmax[index]
        idx = torch.stack((codes >> 4, codes & 15), -1).flatten(-2).long()
        n = idx.shape[-1]
        values = _blocks(nf4_code(codes.device)[idx], self.block) * absmax.unsqueeze(-1)
        return values.flatten(-2)[..., :n].to(dtype or self.dtype).contiguous()  # strided matmuls crawl on CPU

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={self.shape}, block={self.block}, double_quant={self.double_quant}"


# ----------------------------------------------------------------------------- the matmuls


def _compute_dtype(x: torch.Tensor, weight: NF4Weight) -> torch.dtype:
    """What the unquantised layer would multiply in: autocast's dtype where it is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _NF4Linear(torch.autograd.Function):
    """``x W^T + b`` with W (or its ``index``-th slice) dequantised in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias, index):
        dtype = _compute_dtype(x, weight)
        ctx.weight, ctx.index, ctx.dtype, ctx.x_dtype = weight, index, dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), weight.dequantize(dtype, index), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight.dequantize(ctx.dtype, ctx.index)
        grad_x = (grad.to(ctx.dtype) @ w).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class _NF4GroupedMM(torch.autograd.Function):
    """Stacked experts ``[E, out, in]`` in NF4 through the grouped GEMM: rows grouped by ``offs``."""

    @staticmethod
    def forward(ctx, a, weight: NF4Weight, offs, dtype):
        ctx.weight, ctx.dtype, ctx.a_dtype = weight, dtype, a.dtype
        ctx.save_for_backward(offs)
        return grouped_mm(a.to(dtype), weight.dequantize(dtype).transpose(-2, -1), offs)

    @staticmethod
    def backward(ctx, grad):
        (offs,) = ctx.saved_tensors
        w = ctx.weight.dequantize(ctx.dtype)
        return grouped_mm(grad.to(ctx.dtype).contiguous(), w, offs).to(ctx.a_dtype), None, None, None


def is_nf4(weight) -> bool:
    """Whether a weight slot holds the NF4 form of its weight rather than the Parameter."""
    return isinstance(weight, NF4Weight)


def base_linear(x: torch.Tensor, module: nn.Module, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module``'s frozen ``x W^T + b``, W being ``module.weight``: a Parameter or its NF4 form."""
    w = module.weight
    return _NF4Linear.apply(x, w, bias, None) if is_nf4(w) else F.linear(x, w, bias)


def expert_linear(x: torch.Tensor, q: NF4Weight, e: int) -> torch.Tensor:
    """Expert ``e`` of a stacked NF4 weight applied to its rows ``x``."""
    return _NF4Linear.apply(x, q, None, e)


def expert_grouped_mm(a: torch.Tensor, q: NF4Weight, offs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _NF4GroupedMM.apply(a, q, offs, dtype)


class NF4Linear(nn.Module):
    """A plain ``nn.Linear`` of the base, quantised (layers LoRA does not adapt)."""

    def __init__(self, linear: nn.Linear, block: int, double_quant: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = NF4Weight(linear.weight, block, double_quant)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(x, self, self.bias)


def quantize_param(module: nn.Module, name: str, block: int, double_quant: bool) -> None:
    """Put the NF4 form of the Parameter ``module.<name>`` in its slot (under the same name): the module's
    forward sees which it holds (``is_nf4``), and nothing else is added to it."""
    surface.set_part(module, name, NF4Weight(surface.part(module, name), block, double_quant))


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the NF4 weights of ``model`` hold (codes and scales)."""
    return sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Weight))
