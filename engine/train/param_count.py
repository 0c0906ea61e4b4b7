"""Each rank's parameter count from the architecture and the layout alone.

The memory report holds a rank's shards to this count (engine/train/memory.py), and Megatron's byte
formula is fed with it, not with the rank's own count: fed with what the rank holds, "held = formula"
would only check dtypes, and a projection left whole under TP would pass. Written from the config,
never from a built model, in the way Megatron's ``compute_weight_and_optimizer_memory`` counts.

Per layer, with ``t`` the TP size: attention ``(2 h q + 2 h kv) / t`` (q = heads x head_dim, kv = kv
heads x head_dim), q/k/v biases ``(q + 2 kv) / t``, q/k norms ``2 d`` and the two block norms ``2 h``
(replicated); a dense SwiGLU ``3 h F / t``; a MoE layer its router ``E h``, ``E / ep`` routed experts of
``3 h F_e / etp`` each, a shared expert ``3 h F_s / t`` and its gate ``h``. The first pipeline stage
holds the embedding ``V h / t``, the last the final norm ``h`` and the LM head ``V h / t`` (one tensor
with the embedding when tied and both are on one stage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from loom.config import Config
from loom.parallel.mesh import ParallelDims
from loom.parallel.pipeline import stage_layers


@dataclass(frozen=True)
class ParamCount:
    dense: int
    expert: int


def counted(cfg: Config) -> bool:
    """Whether the analytic count covers this model: a text decoder, trained whole (no adapters)."""
    return not cfg.model.vision.enabled and not cfg.finetune.lora.rank


def rank_params(cfg: Config, dims: ParallelDims, pp_rank: int) -> Optional[ParamCount]:
    """Elements of the parameters a rank of pipeline rank ``pp_rank`` holds (None: not ``counted``)."""
    if not counted(cfg):
        return None
    m, p = cfg.model, cfg.parallel
    vpp = max(1, p.vpp)
    stages = stage_layers(m.num_layers, p.pp, vpp, p.pp_layout)
    mine = [chunk * p.pp + pp_rank for chunk in range(vpp)]
    dense = expert = 0
    for i in (layer for s in mine for layer in stages[s]):
        dense += _attention(cfg, dims.tp) + 2 * m.hidden_size
        if m.is_moe_layer(i):
            d, e = _moe(cfg, dims)
            dense, expert = dense + d, expert + e
        else:
            dense += 3 * m.hidden_size * m.intermediate_size // dims.tp
    table = m.vocab_size * m.hidden_size // dims.tp
    first, last = 0 in mine, p.pp * vpp - 1 in mine
    dense += table * first + (m.hidden_size + table) * last
    if m.tie_embeddings and first and last:
        dense -= table
    return ParamCount(dense, expert)


def _attention(cfg: Config, t: int) -> int:
    m = cfg.model
    d = m.resolved_head_dim
    q, kv = m.num_heads * d, m.num_kv_heads * d
    n = (2 * m.hidden_size * q + 2 * m.hidden_size * kv) // t
    if m.attention_bias:
        n += (q + 2 * kv) // t
    return n + (2 * d if m.qk_norm else 0)


def _moe(cfg: Config, dims: ParallelDims) -> tuple[int, int]:
    """(dense, expert) elements of one MoE layer on a rank."""
    m, h = cfg.model, cfg.model.hidden_size
    dense = m.moe.num_experts * h
    shared = m.shared_expert_intermediate_size
    if shared:
        dense += 3 * h * shared // dims.tp + (h if m.moe.shared_expert_gate else 0)
    expert = m.moe.num_experts // dims.ep * 3 * h * m.moe_intermediate_size // dims.resolved_etp
    return dense, expert
