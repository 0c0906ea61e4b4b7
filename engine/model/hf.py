"""Hugging Face <-> Loom naming for the dense Llama / Qwen2 / Qwen3 family.

Loom keeps HF's tensor layouts (rotate-half RoPE, separate q/k/v and gate/up), so conversion
is a renaming; the tables here are the single source of that renaming.
"""
from __future__ import annotations

import re

from engine.config import ModelConfig

# (HF regex, Loom template); {i} is the layer index.
_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "layers.{0}.attn.{1}.{2}"),
    (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", "layers.{0}.attn.{1}.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "layers.{0}.mlp.{1}.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.mlp_norm.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
_REVERSE = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "model.layers.{0}.self_attn.{1}.{2}"),
    (r"layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", "model.layers.{0}.self_attn.{1}.weight"),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "model.layers.{0}.mlp.{1}.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _rename(name: str, table) -> str:
    for pattern, template in table:
        m = re.fullmatch(pattern, name)
        if m:
            return template.format(*m.groups())
    raise KeyError(f"unexpected weight {name!r}: no mapping")


def hf_to_loom_name(name: str) -> str:
    return _rename(name, _NAMES)


def loom_to_hf_name(name: str) -> str:
    return _rename(name, _REVERSE)


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict of a supported dense architecture."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=arch == "Qwen3ForCausalLM",
        attention_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def load_hf_state_dict(model, hf_state: dict) -> None:
    """Copy an HF state dict into a single-device Loom model; every weight must match by name and shape."""
    own = dict(model.named_parameters(remove_duplicate=False))
    seen = set()
    for hf_name, tensor in hf_state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = hf_to_loom_name(hf_name)
        if name not in own:
            raise KeyError(f"HF weight {hf_name!r} maps to {name!r}, which the Loom model does not have")
        if own[name].shape != tensor.shape:
            raise ValueError(f"HF weight {hf_name!r}: shape {tuple(tensor.shape)} != Loom {tuple(own[name].shape)}")
        own[name].data.copy_(tensor)
        seen.add(name)
    missing = set(own) - seen
    if model.cfg.tie_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise KeyError(f"HF state dict lacks {sorted(missing)}")
