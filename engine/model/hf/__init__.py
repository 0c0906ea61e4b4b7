"""Hugging Face <-> Loom, per architecture family: configs, weight names, and streaming conversion.

    naming.py   the rule machinery and the missing / unexpected / shape checks
    dense.py    Llama 3, Qwen2, Qwen3
    moe.py      Mixtral, Qwen2-MoE, Qwen3-MoE (per-expert HF tensors <-> stacked Loom experts)
    llava.py    LLaVA 1.5 (CLIP vision tower + projector + any text family above)
    qwen_vl.py  Qwen2.5-VL, Qwen3-VL (native-resolution tower, patch merger, Qwen2/3 LLM with M-RoPE)
    convert.py  HF directory <-> Loom checkpoint, one tensor in memory at a time
"""
from __future__ import annotations

import torch

from loom.config import ModelConfig
from loom.model.hf.dense import LLAMA, QWEN2, QWEN3
from loom.model.hf.llava import LLAVA
from loom.model.hf.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from loom.model.hf.qwen_vl import QWEN3_VL, QWEN_VL
from loom.model.hf.naming import ConversionError, Family, check_hf_names, weight_map

FAMILIES = (LLAMA, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, LLAVA, QWEN_VL, QWEN3_VL)
VLM_FAMILIES = (LLAVA, QWEN_VL, QWEN3_VL)
SUPPORTED = tuple(arch for f in FAMILIES for arch in f.architectures)


def family_for(hf_config: dict) -> Family:
    """The family of an HF ``config.json`` dict, from its ``architectures``."""
    archs = hf_config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in archs):
            return family
    raise ConversionError(f"config.json: unsupported architecture {archs or '(none given)'}; "
                          f"supported: {', '.join(SUPPORTED)}")


def family_for_model(cfg: ModelConfig, arch: str | None = None) -> Family:
    """The family to export ``cfg`` as: ``arch`` if given, else the closest one."""
    if arch is not None:
        return family_for({"architectures": [arch]})
    if cfg.vision.enabled:
        return {"qwen2_5_vl": QWEN_VL, "qwen3_vl": QWEN3_VL}.get(cfg.vision.arch, LLAVA)
    m = cfg.moe
    if m.num_experts:
        if cfg.qk_norm:
            return QWEN3_MOE
        return QWEN2_MOE if m.num_shared_experts or m.shared_expert_intermediate_size else MIXTRAL
    if cfg.qk_norm:
        return QWEN3
    return QWEN2 if cfg.attention_bias else LLAMA


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict of a supported architecture."""
    cfg = family_for(hf_config).config_from_hf(hf_config)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- in-memory (tests, benchmarks)


def loom_to_hf_name(name: str, family: Family = LLAMA) -> str:
    """HF name of a Loom tensor that maps to exactly one HF tensor (everything but stacked experts)."""
    names, stacked = family.hf_names(name, (1,))
    if stacked:
        raise ConversionError(f"Loom tensor {name!r} is a stack of experts, not one HF tensor")
    return names[0]


def load_hf_state_dict(model, hf_state: dict, family: Family | None = None) -> None:
    """Copy an HF (on-disk format) state dict into a single-device Loom model; names and shapes must match."""
    from loom.checkpoint.names import named_tensors

    family = family or family_for_model(model.cfg)
    if family.specialise is not None:
        family = family.for_checkpoint(family.config_to_hf(model.cfg, {}), hf_state)
    wmap = weight_map(family, model.cfg)
    found = {k: (tuple(v.shape), v.dtype, "state dict") for k, v in hf_state.items()}
    check_hf_names(wmap, found, model.cfg.tie_embeddings, "HF state dict")
    own = named_tensors(model, model.cfg.tie_embeddings)
    with torch.no_grad():
        for loom, hf in wmap.loom_to_hf.items():
            pieces = [hf_state[n] for n in hf]
            own[loom].copy_(torch.stack(pieces) if loom in wmap.stacked else wmap.to_loom(loom, pieces[0]))


__all__ = ["FAMILIES", "SUPPORTED", "ConversionError", "Family", "family_for", "family_for_model",
           "load_hf_state_dict", "loom_to_hf_name", "model_config_from_hf"]
