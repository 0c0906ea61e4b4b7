"""MoE decoder families: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE (q/k-norm).

HF checkpoints keep one tensor per expert (``...experts.N.w1.weight`` in Mixtral,
``...experts.N.gate_proj.weight`` in Qwen); Loom stacks them (``mlp.experts.gate_proj [E, F, h]``).
Mixtral's ``w1`` is the gate projection, ``w3`` the up projection and ``w2`` the down projection.

Routing weights: Mixtral always renormalises the top-k probabilities, Qwen when ``norm_topk_prob``,
both also at top-k 1 (the weight becomes 1.0), which Loom does only under ``moe.norm_top1_prob``:
import sets it, and export writes the renormalisation Loom actually does.

Which layers are MoE: Loom's rule is "from ``first_k_dense`` on, every ``layer_freq``-th";
Qwen's is "not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``". The two
agree when the dense layers are the first k and ``decoder_sparse_step`` is 1; anything else
is refused by name.
"""
from __future__ import annotations

from loom.config import ModelConfig, MoEConfig
from loom.model.hf.dense import common_from_hf, common_to_hf, refuse
from loom.model.hf.naming import COMMON_RULES, DENSE_MLP_RULES, ConversionError, Family
from loom.model.moe import renormalises

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


# The spellings of the expert count each family's config reads (an attribute_map aliases the second).
_MIXTRAL_EXPERT_KEYS = ("num_local_experts", "num_experts")
_QWEN3_EXPERT_KEYS = ("num_experts", "num_local_experts")


def _num_experts(hf: dict, spellings: tuple[str, ...]) -> int:
    return int(next(hf[k] for k in spellings if hf.get(k) is not None))


def _routing(hf: dict, top_k_default: int, renormalise: bool) -> dict:
    """MoEConfig routing keywords for HF's semantics: the top-k weights renormalised iff ``renormalise``.

    ``norm_top1_prob`` is set only where it acts (top-k 1), so a run resuming a top-k > 1 import
    need not spell it out (a resume must repeat every model key the checkpoint was saved with).
    """
    top_k = hf.get("num_experts_per_tok", top_k_default)
    return dict(top_k=top_k, norm_topk_prob=renormalise, norm_top1_prob=renormalise and top_k == 1)


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
               norm_topk_prob=renormalises(m), decoder_sparse_step=1, mlp_only_layers=list(range(m.first_k_dense)),
               use_sliding_window=False)
    out.pop("num_local_experts", None)
    return out


# ----------------------------------------------------------------------------- Mixtral


def mixtral_from_hf(hf: dict) -> ModelConfig:
    common = common_from_hf(hf, required=[_MIXTRAL_EXPERT_KEYS], num_kv_heads=8, rms_norm_eps=1e-5,
                            rope_theta_default=1e6)
    if hf.get("sliding_window") is not None:
        raise ConversionError(f"config.json: sliding_window={hf['sliding_window']} is not supported (only null)")
    moe = MoEConfig(num_experts=_num_experts(hf, _MIXTRAL_EXPERT_KEYS), **_routing(hf, 2, True))
    return ModelConfig(**common, moe=moe)


def mixtral_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _check_moe(cfg, "MixtralForCausalLM")
    m = cfg.moe
    refuse(cfg, "MixtralForCausalLM", qk_norm=cfg.qk_norm, attention_bias=cfg.attention_bias,
           moe__num_shared_experts=m.num_shared_experts or m.shared_expert_intermediate_size,
           moe__first_k_dense=m.first_k_dense, moe__norm_topk_prob=not m.norm_topk_prob,
           moe__norm_top1_prob=not renormalises(m))
    out = common_to_hf(cfg, base, "MixtralForCausalLM", "mixtral")
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
               intermediate_size=cfg.moe_intermediate_size, sliding_window=None)
    out.pop("num_experts", None)
    return out


# ----------------------------------------------------------------------------- Qwen2-MoE / Qwen3-MoE


def qwen2_moe_from_hf(hf: dict) -> ModelConfig:
    common = common_from_hf(hf, required=["num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"],
                            num_kv_heads=16)
    moe = MoEConfig(num_experts=int(hf["num_experts"]), **_routing(hf, 4, bool(hf.get("norm_topk_prob", False))),
                    intermediate_size=hf["moe_intermediate_size"],
                    shared_expert_intermediate_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True,
                    first_k_dense=_first_k_dense(hf))
    return ModelConfig(**common, attention_bias=bool(hf.get("qkv_bias", True)), moe=moe)


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
    common = common_from_hf(hf, required=[_QWEN3_EXPERT_KEYS, "moe_intermediate_size"], num_kv_heads=4)
    moe = MoEConfig(num_experts=_num_experts(hf, _QWEN3_EXPERT_KEYS),
                    **_routing(hf, 8, bool(hf.get("norm_topk_prob", False))),
                    intermediate_size=hf["moe_intermediate_size"], first_k_dense=_first_k_dense(hf))
    return ModelConfig(**common, qk_norm=True, attention_bias=bool(hf.get("attention_bias", False)), moe=moe)


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
