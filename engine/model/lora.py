"""LoRA adapters (Hu et al. 2021): ``y = W x + (alpha / r) B A dropout(x)`` with W frozen.

Single-device code. ``apply_lora`` swaps the targeted ``nn.Linear`` layers for ``LoRALinear`` (same
``weight`` / ``bias`` Parameters, so names and checkpoints of the base stay as they were) and gives
routed experts stacked adapters. Tensor and expert parallelism shard the adapters from outside
(engine/parallel/tensor_parallel.py, expert_parallel.py).

Adapter names, per targeted linear ``X`` and per routed-expert projection ``P``::

    X.lora_A  [r, in]      X.lora_B  [out, r]                  (PEFT's lora_A / lora_B weights)
    experts.adapters.P.lora_A  [E, r, in]    experts.adapters.P.lora_B  [E, out, r]

The experts' adapters go into the slot GroupedExperts declares for them (``stacked_adapters``): LoRA adds
no attribute to a module it does not own.

A starts ``N(0, 1/in)`` and B at zero, so training starts from the base model exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.config import LORA_TARGETS, LoRAConfig
from loom.model import surface
from loom.model.init import ZEROS, normal
from loom.model.quant import NF4Linear, base_linear, quantize_param
from loom.model.surface import COLUMN, REPLICATED, ROW

__all__ = ["LORA_TARGETS", "LoRALinear", "StackedLoRA", "apply_lora", "lora_delta", "is_adapter", "adapted_weight",
           "stacked_adapter_names", "quantize_base"]


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float,
               training: bool) -> torch.Tensor:
    """``scaling * dropout(x) A^T B^T``: the adapter's share of a linear's output."""
    if dropout > 0:
        x = F.dropout(x, dropout, training)
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * scaling


def is_adapter(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def adapted_weight(adapter: str) -> str:
    """The name of the weight an adapter adapts: ``X.lora_A`` -> ``X.weight``, ``experts.adapters.P.lora_A``
    -> ``experts.P``."""
    stem = adapter.rsplit(".", 1)[0]
    owner, slot, weight = stem.rpartition(".adapters.")
    return f"{owner}.{weight}" if slot else f"{stem}.weight"


def is_stacked_adapter(adapter: str) -> bool:
    return ".adapters." in adapter


def stacked_adapter_names(weight: str) -> tuple[str, str]:
    """The (A, B) names of the adapter of stacked weight ``weight`` (``experts.P``)."""
    owner, _, name = weight.rpartition(".")
    return f"{owner}.adapters.{name}.lora_A", f"{owner}.adapters.{name}.lora_B"


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-r adapter; ``weight`` and ``bias`` are the wrapped layer's own."""

    supports_nf4 = True  # forward goes through base_linear, so the weight slot may hold its NF4 form

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoRAConfig) -> "LoRALinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        w = linear.weight
        new.lora_A = nn.Parameter(torch.empty(cfg.rank, new.in_features, dtype=w.dtype, device=w.device))
        new.lora_B = nn.Parameter(torch.empty(new.out_features, cfg.rank, dtype=w.dtype, device=w.device))
        new.lora_scaling, new.lora_dropout = cfg.alpha / cfg.rank, cfg.dropout
        if not w.is_meta:  # on meta the trainer fills every shard from init_rules
            _init_adapter(new.lora_A, new.lora_B, new.in_features)
        return new

    def init_rules(self, std: float) -> dict:
        return {"weight": normal(std), "bias": ZEROS, "lora_A": normal(1 / math.sqrt(self.in_features)),
                "lora_B": ZEROS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(x, self, self.bias) + lora_delta(x, self.lora_A, self.lora_B, self.lora_scaling,
                                                                self.lora_dropout, self.training)


@torch.no_grad()
def _init_adapter(a: torch.Tensor, b: torch.Tensor, fan_in: int) -> None:
    a.normal_(0.0, 1 / math.sqrt(fan_in))
    b.zero_()


class StackedLoRA(nn.Module):
    """The per-expert adapters of one stacked weight ``[E, out, in]``: ``lora_A [E, r, in]``, ``lora_B
    [E, out, r]``. Its surface says how expert tensor parallelism splits each factor: the one that
    holds the weight's F (``out`` of a column weight, ``in`` of a row one) is split like it, the other
    stays whole on every etp rank."""

    def __init__(self, weight, role: str, cfg: LoRAConfig):
        super().__init__()
        e, out, inp = weight.shape
        self.role = role
        self.lora_A = nn.Parameter(torch.empty(e, cfg.rank, inp, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(e, out, cfg.rank, dtype=weight.dtype, device=weight.device))
        self.scaling, self.dropout = cfg.alpha / cfg.rank, cfg.dropout
        if not weight.is_meta:
            _init_adapter(self.lora_A, self.lora_B, inp)

    def surface(self) -> surface.Surface:
        factors = {"lora_A": REPLICATED, "lora_B": COLUMN} if self.role == COLUMN else {"lora_A": ROW, "lora_B": REPLICATED}
        return surface.Surface(stacked=factors)

    def init_rules(self, std: float) -> dict:
        return {"lora_A": normal(self.lora_A.shape[-1] ** -0.5), "lora_B": ZEROS}

    def delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mm) -> torch.Tensor:
        """``scaling * mm(mm(dropout(x), a), b)``: ``a`` / ``b`` the factors (stacked, or one expert's) and
        ``mm`` their product with rows (a grouped GEMM, or ``F.linear``)."""
        x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return mm(mm(x, a), b) * self.scaling


def add_expert_adapters(experts: nn.Module, cfg: LoRAConfig) -> None:
    """Stacked adapters for each stacked weight of ``experts`` (a GroupedExperts): one adapter per expert."""
    for name, role in surface.surface_of(experts).stacked.items():
        surface.add_stacked_adapter(experts, name, StackedLoRA(surface.part(experts, name), role, cfg))


def _wrap(owner: nn.Module, name: str, cfg: LoRAConfig) -> int:
    linear = surface.part(owner, name)
    if isinstance(linear, nn.Linear) and not isinstance(linear, LoRALinear):
        surface.set_part(owner, name, LoRALinear.from_linear(linear, cfg))
        return 1
    return 0


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Give ``model`` (a Transformer or a VisionLanguageModel, before parallelize) the adapters that
    ``cfg.target_modules`` names; freeze everything else. Returns the number of adapted layers.

    The names are the model's declared adapter targets (engine/model/surface.py): ``q_proj`` ...
    ``down_proj`` the decoder's attention and dense MLP projections; ``shared_expert`` and ``experts``
    the MoE layers' shared and routed experts; ``vision`` every projection of the tower's blocks (not
    the patch embedding) and ``projector`` the projector's.
    """
    if cfg.rank == 0:
        return 0
    n = 0
    for owner, name, role in list(surface.adapter_sites(model, cfg.target_modules)):
        if role == "stacked":
            add_expert_adapters(owner, cfg)
            n += 1
        else:
            n += _wrap(owner, name, cfg)
    if n == 0:
        raise ValueError(f"finetune.lora.target_modules={cfg.target_modules} matches no layer of this model")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
    return n


@torch.no_grad()
def quantize_base(model: nn.Module, cfg: LoRAConfig) -> int:
    """QLoRA: store every frozen linear weight of the language model's blocks in NF4 (engine/model/quant.py):
    the attention and MLP projections, shared experts and routed experts (per expert), whether adapted or
    not. Embeddings, norms, routers, the LM head and a vision tower keep the model dtype. Runs on this
    rank's shards, once their weights are final (initialised or loaded). Returns the number quantised."""
    if cfg.base_dtype != "nf4":
        return 0
    block, dq, n = cfg.quant_block, cfg.double_quant, 0
    for layer in surface.blocks(surface.language_model(model)).values():
        for module, s in surface.declared(layer):
            if isinstance(module, StackedLoRA):  # adapters train: they stay in the model dtype
                continue
            for name in s.stacked:
                quantize_param(module, name, block, dq)
                n += 1
            for name, _ in surface.parts(module, [k for k, role in s.projections.items() if role in (COLUMN, ROW)]):
                n += _quantize_linear(module, name, block, dq)
    return n


def _quantize_linear(owner: nn.Module, name: str, block: int, double_quant: bool) -> int:
    layer = surface.part(owner, name)
    if type(layer) is nn.Linear:
        surface.set_part(owner, name, NF4Linear(layer, block, double_quant))
    elif getattr(layer, "supports_nf4", False):
        quantize_param(layer, "weight", block, double_quant)
    else:
        raise TypeError(f"{type(layer).__name__} cannot hold an NF4 weight (its forward must use base_linear)")
    return 1
