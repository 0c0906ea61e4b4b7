"""Dense decoder families: Llama 3, Qwen2 (q/k/v bias), Qwen3 (q/k-norm, often tied embeddings)."""
from __future__ import annotations

from loom.config import ModelConfig
from loom.model.hf.naming import COMMON_RULES, DENSE_MLP_RULES, ConversionError, Family, require

# What every family here needs to size the model; transformers' defaults for these are some
# release's sizes, never a reason to guess.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def rope_theta(hf: dict, default: float = 10000.0) -> float:
    """RoPE base from either spelling (transformers 5 ``rope_parameters``, older ``rope_theta``).

    Scaled RoPE (Llama 3.1 ``llama3``, YaRN, ...) changes the frequencies; Loom does not
    implement it, so it is refused rather than converted into a silently different model.
    """
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ConversionError(f"config.json: rope_parameters.rope_type={kind!r} (scaled RoPE) is not supported")
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def common_from_hf(hf: dict, required=(), num_kv_heads=None, head_dim=None, rms_norm_eps=1e-6,
                   rope_theta_default=10000.0) -> dict:
    """ModelConfig keyword arguments every family here shares.

    ``required``: the family's own required keys, checked with ``REQUIRED`` before anything is
    read. The other arguments are the family's transformers defaults for keys a config.json may
    leave out; they differ between families. An explicit null head_dim or num_key_value_heads
    means hidden_size / num_attention_heads, or num_attention_heads, as in transformers.
    """
    require(hf, REQUIRED + tuple(required))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"config.json: hidden_act={act!r} is not supported (Loom's MLP is SwiGLU)")
    if hf.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise ConversionError("config.json: use_sliding_window=true is not supported")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", num_kv_heads) or hf["num_attention_heads"],
        head_dim=hf.get("head_dim", head_dim),
        rope_theta=rope_theta(hf, rope_theta_default),
        rms_norm_eps=float(hf.get("rms_norm_eps", rms_norm_eps)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def common_to_hf(cfg: ModelConfig, base: dict, arch: str, model_type: str) -> dict:
    """The HF config: ``base`` (the imported config.json, if any) with every structural key from ``cfg``."""
    out = {k: v for k, v in base.items() if k not in ("rope_scaling", "torch_dtype")}
    out.update(
        architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.resolved_head_dim,
        hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    out.setdefault("max_position_embeddings", 4096)
    return out


def refuse(cfg: ModelConfig, family: str, **wrong) -> None:
    """Raise if ``cfg`` has a feature ``family`` cannot express.

    ``wrong`` maps a model key (dots spelled ``__``: ``moe__top_k``) to whether its value is one
    the family lacks; the error names the key and its value.
    """
    for key, bad in wrong.items():
        if bad:
            name = key.replace("__", ".")
            value = cfg
            for part in name.split("."):
                value = getattr(value, part)
            raise ConversionError(f"model.{name}={value!r} is not expressible as {family}")


def _dense_only(cfg: ModelConfig, family: str) -> None:
    refuse(cfg, family, moe__num_experts=cfg.moe.num_experts > 0)


# ----------------------------------------------------------------------------- Llama


def llama_from_hf(hf: dict) -> ModelConfig:
    if hf.get("attention_bias"):  # Llama's flag also puts a bias on o_proj, which Loom lacks
        raise ConversionError("config.json: attention_bias=true is not supported for LlamaForCausalLM")
    return ModelConfig(**common_from_hf(hf))


def llama_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _dense_only(cfg, "LlamaForCausalLM")
    refuse(cfg, "LlamaForCausalLM", qk_norm=cfg.qk_norm, attention_bias=cfg.attention_bias)
    return {**common_to_hf(cfg, base, "LlamaForCausalLM", "llama"), "attention_bias": False, "mlp_bias": False}


# ----------------------------------------------------------------------------- Qwen2 / Qwen3


def qwen2_from_hf(hf: dict) -> ModelConfig:
    return ModelConfig(**common_from_hf(hf, num_kv_heads=32), attention_bias=True)


def qwen2_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _dense_only(cfg, "Qwen2ForCausalLM")
    refuse(cfg, "Qwen2ForCausalLM", qk_norm=cfg.qk_norm, attention_bias=not cfg.attention_bias)
    return {**common_to_hf(cfg, base, "Qwen2ForCausalLM", "qwen2"), "use_sliding_window": False}


def qwen3_from_hf(hf: dict) -> ModelConfig:
    return ModelConfig(**common_from_hf(hf, num_kv_heads=32, head_dim=128), qk_norm=True,
                       attention_bias=bool(hf.get("attention_bias", False)))


def qwen3_to_hf(cfg: ModelConfig, base: dict) -> dict:
    _dense_only(cfg, "Qwen3ForCausalLM")
    refuse(cfg, "Qwen3ForCausalLM", qk_norm=not cfg.qk_norm)
    return {**common_to_hf(cfg, base, "Qwen3ForCausalLM", "qwen3"), "attention_bias": cfg.attention_bias,
            "use_sliding_window": False}


RULES = COMMON_RULES + DENSE_MLP_RULES
LLAMA = Family("Llama", ("LlamaForCausalLM",), llama_from_hf, llama_to_hf, RULES)
QWEN2 = Family("Qwen2", ("Qwen2ForCausalLM",), qwen2_from_hf, qwen2_to_hf, RULES)
QWEN3 = Family("Qwen3", ("Qwen3ForCausalLM",), qwen3_from_hf, qwen3_to_hf, RULES)
