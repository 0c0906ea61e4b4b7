"""Each rank's memory: parameters, gradients, optimizer states and activations, measured and by formula.

Measured: from the tensors the rank holds (its parameter and gradient buckets, its optimizer
shards), and for activations either the ActivationTracker (engine/train/activations.py: bytes a
microbatch keeps for backward) or, on CUDA, the allocator's peak above the state. A dry run
(tools/memory.py) measures the same tensors on the meta device, and takes activations from the formula.

The formula is Megatron's. Bytes per parameter (its distributed-optimizer table): fp32 weights
4 + 4 (fp32 gradients) + 8/d (Adam's two moments), bf16 weights 2 + 4 + 12/d (fp32 master weights
and the moments), d the data-parallel size the optimizer is sharded over (dp x cp for dense
weights, the expert-data-parallel size for experts; 1 without ``optim.distributed``).

Activations per layer and microbatch follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), in units of s*b*h bytes at 16 bits, adapted to what
Loom's blocks keep:

- the paper's 34 = 11 (attention) + 19 (GELU MLP) + 4 (two LayerNorm inputs), with 5as/h for the
  attention scores. Loom's attention is fused (flash-style: no s x s scores) and has no dropout,
  so the 5as/h term and the three dropout masks go;
- attention with GQA (g = kv_heads / heads): input 2, Q 2, K and V 4g, output 2 (the core's output
  is the o_proj input): 6 + 4g;
- a SwiGLU MLP of width F: input 2, gate and up outputs 4F/h, their product 2F/h: 2 + 6F/h;
  a MoE layer: input 2 (router and dispatch), each of its top-k copies 2 + 6F_e/h (F_e split by
  etp), a shared expert 6F_s/h;
- norms: two inputs, 4.

Without SP the norm inputs and the attention and MLP inputs (8 units) are whole on every TP rank
and the rest is split (the paper's 10 + 24/t); with SP all of it is split by t. Under CP s is the
rank's share. ``selective`` drops the attention core's internals (none are kept by a fused kernel,
so nothing changes, as the paper notes for flash attention) and the MoE activation products;
``full`` keeps only each recomputed block's input, 2/t (2 without SP). fp32 doubles everything.
A pipeline stage holds ``in_flight_bound`` microbatches (x chunks) at once.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from loom.config import Config
from loom.model import surface
from loom.parallel.mesh import ParallelDims
from loom.parallel.pipeline_schedule import in_flight_bound
from loom.model.quant import NF4Weight
from loom.parallel.sharding import spec_of
from loom.train.param_count import rank_params


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "meta":
            key, size = ("meta", id(t)), t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            key, size = (t.device.type, storage.data_ptr()), storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += size
    return total


def megatron_bytes_per_param(dtype: str, distributed: bool, dp: int) -> dict[str, float]:
    d = dp if distributed else 1
    if dtype == "bf16":
        return {"params": 2.0, "grads": 4.0, "optimizer": 12.0 / d}
    return {"params": 4.0, "grads": 4.0, "optimizer": 8.0 / d}


def formula_bytes(cfg: Config, dims: ParallelDims, dense_params: int, expert_params: int) -> dict:
    """Megatron's parameter, gradient and optimizer bytes for a rank holding these parameters."""
    distributed = cfg.distributed_optimizer(dims.world_size)
    dense = megatron_bytes_per_param(cfg.train.dtype, distributed, dims.dp * dims.cp)
    expert = megatron_bytes_per_param(cfg.train.dtype, distributed, dims.edp)
    out = {f"{k}_bytes": dense[k] * dense_params + expert[k] * expert_params for k in dense}
    out["bytes_per_param"] = dense["params"] + dense["grads"] + dense["optimizer"]
    return out


def activation_units_per_layer(cfg: Config, dims: ParallelDims, moe_layer: bool, recompute: str) -> float:
    """One layer's activations in units of s*b*h bytes (16-bit), per the module docstring."""
    m, t, sp = cfg.model, dims.tp, cfg.parallel.sp
    if recompute == "full":
        return 2 / t if sp else 2.0
    g = m.num_kv_heads / m.num_heads
    whole = 4 + 2 + 2  # norm inputs, attention input, MLP input
    split = 4 + 4 * g  # Q, K, V, the core's output
    if moe_layer:
        k = m.moe.top_k
        expert_width = m.moe_intermediate_size / dims.resolved_etp / m.hidden_size
        per_copy = 2 + (4 if recompute == "selective" else 6) * expert_width
        split += k * per_copy + 6 * m.shared_expert_intermediate_size / t / m.hidden_size
    else:
        split += 6 * m.intermediate_size / m.hidden_size
    return (whole + split) / t if sp else whole + split / t


def activation_bytes(cfg: Config, dims: ParallelDims, layers_on_rank: list[int], pp_rank: int) -> int:
    """The rank's peak activation bytes: its layers, times the microbatches (x chunks) in flight."""
    if not layers_on_rank:
        return 0
    s = cfg.data.seq_len // dims.cp
    b = cfg.train.micro_batch_size
    h = cfg.model.hidden_size
    full_layers = set(sorted(layers_on_rank)[:cfg.train.recompute_layers]) if cfg.train.recompute_layers \
        is not None else set(layers_on_rank)
    units = 0.0
    for i in layers_on_rank:
        mode = cfg.train.recompute
        if mode == "full" and i not in full_layers:
            mode = "none"
        units += activation_units_per_layer(cfg, dims, cfg.model.is_moe_layer(i), mode)
    per_microbatch = units * s * b * h * (2 if cfg.train.dtype == "fp32" else 1)
    p, vpp = cfg.parallel, max(1, cfg.parallel.vpp)
    microbatches = cfg.train.global_batch_size // (dims.dp * b)
    if p.pp == 1:
        return int(per_microbatch)
    in_flight = in_flight_bound(p.pp_schedule, p.pp, vpp, microbatches, pp_rank)
    return int(per_microbatch / vpp * in_flight)


@dataclass
class MemoryReport:
    rank: int
    world_size: int
    layout: str
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    activations_source: str  # measured | formula
    formula: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def count_mismatch(self) -> Optional[str]:
        """Where this rank holds other parameter counts than the architecture and layout give: a part
        left whole (or cut twice) by a parallel pass. None when they agree, or the count does not apply."""
        f = self.formula
        if f.get("params_source") != "architecture":
            return None
        bad = [f"{kind} {f[f'held_{kind}_params']:,} held, {f[f'{kind}_params']:,} by the architecture"
               for kind in ("dense", "expert") if f[f"held_{kind}_params"] != f[f"{kind}_params"]]
        return f"rank {self.rank} ({self.layout}) parameters: " + "; ".join(bad) if bad else None

    def format(self) -> str:
        total = self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
        unit, gib = ("GiB", 2.0**30) if total >= 2**30 else ("MiB", 2.0**20)
        rows = [("parameters", self.params_bytes, self.formula.get("params_bytes")),
                ("gradients", self.grads_bytes, self.formula.get("grads_bytes")),
                ("optimizer", self.optimizer_bytes, self.formula.get("optimizer_bytes")),
                (f"activations ({self.activations_source})", self.activations_bytes,
                 self.formula.get("activations_bytes"))]
        lines = [f"memory of rank {self.rank} of {self.world_size} ({self.layout}), {unit}: "
                 f"{'':>4}{'held':>10} {'formula':>10} {'ratio':>6}"]
        for name, held, formula in rows:
            ratio = f"{held / formula:6.3f}" if formula else f"{'-':>6}"
            lines.append(f"  {name:<24} {held / gib:10.3f} {(formula or 0) / gib:10.3f} {ratio}")
        lines.append(f"  {'total':<24} {total / gib:10.3f}")
        if self.formula.get("params_source") == "architecture":
            lines.append(f"  parameters by the architecture and layout: {self.count_mismatch() or 'as held'}")
        return "\n".join(lines)

    def write(self, run_dir) -> Path:
        path = Path(run_dir) / f"memory_rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def layout_name(dims: ParallelDims) -> str:
    return (f"tp{dims.tp} pp{dims.pp} cp{dims.cp} dp{dims.dp} ep{dims.ep} etp{dims.resolved_etp}")


def build_report(*, cfg: Config, dims: ParallelDims, rank: int, pp_rank: int, params: list[torch.Tensor],
                 grads: list[torch.Tensor], optimizer_bytes: int, dense_params: int, expert_params: int,
                 layers_on_rank: list[int], activations: Optional[int] = None, frozen_bytes: int = 0) -> MemoryReport:
    """The report; Megatron's formula counts the parameters from the architecture and the layout
    (param_count.py) where it can, so that a shard of the wrong size shows as held != formula."""
    analytic = rank_params(cfg, dims, pp_rank)
    counts = (dense_params, expert_params) if analytic is None else (analytic.dense, analytic.expert)
    formula = formula_bytes(cfg, dims, *counts)
    formula["params_bytes"] += frozen_bytes  # a frozen base (LoRA, finetune.freeze): weights, no grads or states
    formula["activations_bytes"] = activation_bytes(cfg, dims, layers_on_rank, pp_rank)
    formula.update(dense_params=counts[0], expert_params=counts[1], layers=len(layers_on_rank),
                   held_dense_params=dense_params, held_expert_params=expert_params,
                   params_source="architecture" if analytic is not None else "held")
    return MemoryReport(rank, dims.world_size, layout_name(dims), tensors_bytes(params), tensors_bytes(grads),
                        optimizer_bytes, formula["activations_bytes"] if activations is None else activations,
                        "formula" if activations is None else "measured", formula)


def report_rank(cfg: Config, groups, model: torch.nn.Module, optimizer,
                activations: Optional[int] = None) -> MemoryReport:
    """The report of this rank from what it holds (``model``: every chunk under global names)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    buckets = optimizer.grads.buckets
    in_buckets = {id(p) for b in buckets for p in b.params}
    nf4 = [b for m in model.modules() if isinstance(m, NF4Weight) for b in m.buffers()]  # QLoRA's base
    held = [b.param_data for b in buckets] + [p for p in params if id(p) not in in_buckets] + nf4  # padding included
    expert = sum(p.numel() for p in trainable if spec_of(p).expert)
    layers = sorted(surface.blocks(surface.language_model(model)))
    return build_report(cfg=cfg, dims=groups.dims, rank=groups.rank, pp_rank=groups.pp_rank, params=held,
                        grads=[b.grad_data for b in buckets], optimizer_bytes=optimizer.state_bytes(),
                        dense_params=sum(p.numel() for p in trainable) - expert, expert_params=expert,
                        layers_on_rank=layers, activations=activations,
                        frozen_bytes=tensors_bytes([p for p in params if not p.requires_grad] + nf4))
