"""MoE decoder families: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE (q/k-norm).

HF checkpoints keep one tensor per expert (``...experts.N.w1.weight`` in Mixtral,
``...experts.N.gate_proj.weight`` in Qwen); Loom stacks them (``mlp.experts.gate_proj [E, F, h]``).
Mixtral's ``w1`` is the gate projection, ``w3`` the up projection and ``w2`` the down projection.

Which layers are MoE: Loom's rule is "from ``first_k_dense`` on, every ``layer_freq``-th";
Qwen's is "not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``". The two
agree when the dense layers are the first k and ``decoder_sparse_step`` is 1; anything else
is refused by name.
"""
from __future__ import annotations

from engine.config import ModelConfig, MoEConfig
from engine.model.hf.dense import common_from_hf, common_to_hf, refuse
from engine.model.hf.naming import COMMON_RULES, DENSE_MLP_RULES, ConversionError, Family

_QWEN_EXPERTS = [
    (r"layers\.(\d+)\.mlp\.gate\.weight", "model.layers.{0}.mlp.gate.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", "model.layers.{0}.mlp.experts.{e}.{1}.weight"),
    (r"layers\.(\d+)\.mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight",
     "model.layers.{0}.mlp.shared_expert.{1}.weight"),
    (r"layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "model.layers.{0}.mlp.shared_expert_gate.weight"),
]
_MIXTRAL_EXPERTS = [
    (r"layers\.(\d+)\.mlp\.gate\.weight", "model.layers.{0}.block_sparse_moe.gate.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.gate_proj", "model.layers.{0}.block_sparse_moe.experts.{e}.w1.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.down_proj", "model.layers.{0}.block_sparse_moe.experts.{e}.w2.weight"),
    (r"layers\.(\d+)\.mlp\.experts\.up_proj", "model.layers.{0}.block_sparse_moe.experts.{e}.w3.weight"),
]


def _num_experts(hf: dict) -> int:
    n = hf.get("num_experts") or hf.get("num_local_experts")
    if not n:
        raise ConversionError("config.json: num_experts (or num_local_experts) is missing")
    return int(n)


def _first_k_dense(hf: dict) -> int:
    """Qwen's MoE-layer rule as Loom's ``first_k_dense`` (with ``layer_freq`` 1), or an error."""
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise ConversionError(f"config.json: decoder_sparse_step={step} is not supported (only 1)")
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise ConversionError(f"config.json: mlp_only_layers={dense} is not supported (only the first k layers)")
    return len(dense)


def _check_moe(cfg: ModelConfig, family: str) -> None:
    m = cfg.moe
    refuse(cfg, family, moe__num_experts=m.num_experts == 0, moe__router=m.router != "softmax",
           moe__layer_freq=m.layer_freq != 1, moe__n_group=m.n_group != 1,
           moe__routed_scaling_factor=m.routed_scaling_factor != 1.0, moe__bias_update_rate=m.bias_update_rate > 0)


def _qwen_moe_to_hf(cfg: ModelConfig, base: dict, arch: str, model_type: str) -> dict:
    m = cfg.moe
    out = common_to_hf(cfg, base, arch, model_type)
    out.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=cfg.moe_intermediate_size,
               norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(range(m.first_k_dense)),
               use_sliding_window=False)
    out.pop("num_local_experts", None)
    return out


# ----------------------------------------------------------------------------- Mixtral


def mixtral_from_hf(hf: dict) -> ModelConfig:
    moe = MoEConfig(num_experts=_num_experts(hf), top_k=hf.get("num_experts_per_tok", 2), norm_topk_prob=True)
    return ModelConfig(**common_from_hf(hf), moe=moe)


def mixtral_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _check_moe(cfg, "MixtralForCausalLM")
    m = cfg.moe
    refuse(cfg, "MixtralForCausalLM", qk_norm=cfg.qk_norm, attention_bias=cfg.attention_bias,
           moe__num_shared_experts=m.num_shared_experts or m.shared_expert_intermediate_size,
           moe__first_k_dense=m.first_k_dense, moe__norm_topk_prob=not m.norm_topk_prob)
    out = common_to_hf(cfg, base, "MixtralForCausalLM", "mixtral")
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k, intermediate_size=cfg.moe_intermediate_size)
    return out


# ----------------------------------------------------------------------------- Qwen2-MoE / Qwen3-MoE


def qwen2_moe_from_hf(hf: dict) -> ModelConfig:
    moe = MoEConfig(num_experts=_num_experts(hf), top_k=hf.get("num_experts_per_tok", 4),
                    intermediate_size=hf["moe_intermediate_size"],
                    shared_expert_intermediate_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True,
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)), first_k_dense=_first_k_dense(hf))
    return ModelConfig(**common_from_hf(hf), attention_bias=bool(hf.get("qkv_bias", True)), moe=moe)


def qwen2_moe_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _check_moe(cfg, "Qwen2MoeForCausalLM")
    m = cfg.moe
    refuse(cfg, "Qwen2MoeForCausalLM", qk_norm=cfg.qk_norm,
           moe__shared_expert_intermediate_size=not cfg.shared_expert_intermediate_size,
           moe__shared_expert_gate=not m.shared_expert_gate)
    out = _qwen_moe_to_hf(cfg, base, "Qwen2MoeForCausalLM", "qwen2_moe")
    out.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=cfg.attention_bias)
    return out


def qwen3_moe_from_hf(hf: dict) -> ModelConfig:
    moe = MoEConfig(num_experts=_num_experts(hf), top_k=hf.get("num_experts_per_tok", 8),
                    intermediate_size=hf["moe_intermediate_size"], norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    first_k_dense=_first_k_dense(hf))
    return ModelConfig(**common_from_hf(hf), qk_norm=True, attention_bias=bool(hf.get("attention_bias", False)),
                       moe=moe)


def qwen3_moe_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _check_moe(cfg, "Qwen3MoeForCausalLM")
    m = cfg.moe
    refuse(cfg, "Qwen3MoeForCausalLM", qk_norm=not cfg.qk_norm,
           moe__num_shared_experts=m.num_shared_experts or m.shared_expert_intermediate_size)
    return {**_qwen_moe_to_hf(cfg, base, "Qwen3MoeForCausalLM", "qwen3_moe"), "attention_bias": cfg.attention_bias}


_DENSE_AND_COMMON = COMMON_RULES + DENSE_MLP_RULES
MIXTRAL = Family("Mixtral", ("MixtralForCausalLM",), mixtral_from_hf, mixtral_to_hf,
                 _DENSE_AND_COMMON + _MIXTRAL_EXPERTS)
QWEN2_MOE = Family("Qwen2-MoE", ("Qwen2MoeForCausalLM",), qwen2_moe_from_hf, qwen2_moe_to_hf,
                   _DENSE_AND_COMMON + _QWEN_EXPERTS)
QWEN3_MOE = Family("Qwen3-MoE", ("Qwen3MoeForCausalLM",), qwen3_moe_from_hf, qwen3_moe_to_hf,
                   _DENSE_AND_COMMON + _QWEN_EXPERTS)
