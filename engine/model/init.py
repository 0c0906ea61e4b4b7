"""Initial weights as a pure function of (seed, parameter name, global position): any layout, any rank.

Every parameter's global tensor is defined block by block: dim 0 is cut into blocks of about
``BLOCK_NUMEL`` elements (a whole number of rows; one expert of a stacked ``[E, F, h]`` weight when
an expert is larger), and block ``b`` is drawn from a generator seeded by ``(seed, name, b)``. A rank
that holds a shard draws only the blocks its shard overlaps and keeps the overlap, so

- the global weights are identical under every layout (TP, PP, EP, DP, CP change nothing), which
  the parity suites rely on;
- a rank never holds more than its shard plus one block: the model is built on the meta device,
  parallelized there, and only then is each local shard allocated and filled (``initialize``).

The rule per parameter (``init_rules``) is Megatron's and HF's: linear and embedding weights,
routers and experts ``N(0, init_std)``, biases zero, norm weights one. A ViT's learned positions
start as 2-D sine-cosine (MAE); its class token and class position ``N(0, init_std)``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from loom.checkpoint.names import named_tensors
from loom.model.layers import RMSNorm
from loom.model.moe import GroupedExperts, Router

BLOCK_NUMEL = 1 << 22


@dataclass(frozen=True)
class Init:
    """``normal``: N(0, std); ``const``: filled with ``value``; ``table``: ``table()`` is the (small) global tensor."""

    kind: str
    std: float = 0.0
    value: float = 0.0
    table: Optional[Callable[[int], torch.Tensor]] = None  # seed -> global tensor


def normal(std: float) -> Init:
    return Init("normal", std=std)


ZEROS, ONES = Init("const", value=0.0), Init("const", value=1.0)


def _module_rules(module: nn.Module, std: float) -> dict[str, Init]:
    """Rules for ``module``'s own parameters and buffers (not its children's)."""
    rules = getattr(module, "init_rules", None)  # a module with its own parameters says how to start them
    if rules is not None:
        return rules(std)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return {"weight": normal(std), "bias": ZEROS}
    if isinstance(module, (RMSNorm, nn.LayerNorm)):
        return {"weight": ONES, "bias": ZEROS}
    if isinstance(module, Router):
        return {"weight": normal(std), "e_score_correction_bias": ZEROS}
    if isinstance(module, GroupedExperts):
        return {"gate_proj": normal(std), "up_proj": normal(std), "down_proj": normal(std)}
    return {}


def init_rules(model: nn.Module, std: float) -> dict[str, Init]:
    """Stable name -> Init for every parameter and buffer of ``model``; raises for one without a rule."""
    rules = {}
    for prefix, module in model.named_modules():
        own = _module_rules(module, std)
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if tensor is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if name not in own:
                raise ValueError(f"no initialisation rule for {full} ({type(module).__name__}.{name})")
            rules[full] = own[name]
    return rules


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def block_rows(global_shape: Sequence[int]) -> int:
    """Rows (dim-0 entries) per generator block: a function of the global shape only."""
    row = 1
    for n in global_shape[1:]:
        row *= n
    return max(1, BLOCK_NUMEL // max(1, row))


@torch.no_grad()
def fill_shard(out: torch.Tensor, init: Init, seed: int, name: str,
               global_shape: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """Write into ``out`` (this rank's shard at ``offsets`` of a ``global_shape`` tensor) its initial values."""
    if init.kind == "const":
        return out.fill_(init.value)
    if out.dim() == 0:
        global_shape, offsets = (1,), (0,)
        out = out.view(1)
    region = tuple(slice(o, o + n) for o, n in zip(offsets[1:], out.shape[1:]))
    if init.kind == "table":
        full = init.table(block_seed(seed, name, 0))
        return out.copy_(full[(slice(offsets[0], offsets[0] + out.shape[0]), *region)])
    rows = block_rows(global_shape)
    start, stop = offsets[0], offsets[0] + out.shape[0]
    for block in range(start // rows, -(-stop // rows)):
        lo, hi = block * rows, min((block + 1) * rows, global_shape[0])
        gen = torch.Generator(device=out.device).manual_seed(block_seed(seed, name, block))
        values = torch.randn((hi - lo, *global_shape[1:]), generator=gen, device=out.device, dtype=torch.float32)
        a, b = max(lo, start), min(hi, stop)
        out[a - start:b - start].copy_(values[(slice(a - lo, b - lo), *region)].mul_(init.std))
    return out


def initialize_full(model: nn.Module, seed: int, std: float) -> None:
    """Fill a whole, unsharded ``model`` (on a real device) as ``fill_shard`` would at world size 1."""
    rules = init_rules(model, std)
    # Whole and untied by name: a tied head is the embedding's tensor, so it is listed (and filled) once.
    for name, tensor in named_tensors(model, tie_embeddings=False).items():
        fill_shard(tensor.data, rules[name], seed, name, tuple(tensor.shape), (0,) * tensor.dim())


def seed_from_rng() -> int:
    """A seed drawn from torch's global generator: ``torch.manual_seed(s)`` then a build is reproducible."""
    return int(torch.randint(0, 2**62, (1,)).item())
