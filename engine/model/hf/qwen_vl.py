"""Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).

Qwen2.5-VL: the native-resolution tower (window attention), its merger, a Qwen2 LLM with M-RoPE.
Qwen3-VL: the tower with learned positions and DeepStack mergers, a Qwen3 LLM with interleaved M-RoPE.
Loom's names: the tower is ``vision.*`` (engine/model/vision_qwen.py), HF's ``merger`` is Loom's
``projector`` (so a swapped tower keeps the projector slot; Qwen3-VL's DeepStack mergers are
``projector.deepstack.N``), the LLM is ``llm.*`` with the Qwen2 / Qwen3 rules. HF fuses the
tower's q/k/v into one ``qkv`` Linear; Loom keeps them apart (``Fused`` rules: import slices,
export concatenates, both exact). The Conv3d patch embedding is Loom's Linear over flattened
patches, a reshape.

Checkpoints name the parts in two ways, both of which transformers 5 loads:

    Qwen2.5-VL saved (Hub, save_pretrained)       model.                 lm_head  visual.
    in-memory state dict, and Qwen3-VL saved      model.language_model.  lm_head  model.visual.

Import finds the prefixes from the weight names; export writes the names it imported, and the
family's saved layout for a model that was never imported.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Collection, Optional

from loom.config import ModelConfig, VisionConfig
from loom.model.hf.dense import QWEN2, QWEN3, refuse
from loom.model.hf.llava import _text_rules
from loom.model.hf.naming import ConversionError, Family, Fused, MissingKeys, require

ARCH = "Qwen2_5_VLForConditionalGeneration"
ARCH3 = "Qwen3VLForConditionalGeneration"
SAVED_PREFIXES = {"lm": "model.", "head": "", "vision": "visual."}
SAVED_PREFIXES3 = {"lm": "model.language_model.", "head": "", "vision": "model.visual."}
_ANCHORS = [("lm", "embed_tokens.weight"), ("head", "lm_head.weight"), ("vision", "patch_embed.proj.weight")]
# transformers' defaults for vision keys a config.json may leave out.
_VISION_DEFAULTS = dict(temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[],
                        tokens_per_second=4, in_channels=3, hidden_act="silu")
_VISION_DEFAULTS3 = dict(temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                         deepstack_visual_indexes=[8, 16, 24], in_channels=3, hidden_act="gelu_pytorch_tanh")
_VISION_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size")


def _vision_rules(temporal_patch: int, qwen3: bool = False) -> list:
    layer = r"vision\.layers\.(\d+)\."
    blk = "{vision}blocks.{0}."

    def conv_shape(shape):  # Linear [out, 3*t*p*p] <-> Conv3d [out, 3, t, p, p]
        p = math.isqrt(shape[1] // (3 * temporal_patch))
        return shape[0], 3, temporal_patch, p, p

    common = [
        (r"vision\.patch_embed\.weight", "{vision}patch_embed.proj.weight", conv_shape),
        (layer + r"attn\.(q|k|v)_proj\.(weight|bias)", blk + "attn.qkv.{2}", Fused(1, ("q", "k", "v"))),
        (layer + r"attn\.o_proj\.(weight|bias)", blk + "attn.proj.{1}"),
        (layer + r"attn_norm\.(weight|bias)", blk + "norm1.{1}"),
        (layer + r"mlp_norm\.(weight|bias)", blk + "norm2.{1}"),
    ]
    if not qwen3:
        return common + [
            (layer + r"mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", blk + "mlp.{1}.{2}"),
            (r"projector\.norm\.weight", "{vision}merger.ln_q.weight"),
            (r"projector\.fc1\.(weight|bias)", "{vision}merger.mlp.0.{0}"),
            (r"projector\.fc2\.(weight|bias)", "{vision}merger.mlp.2.{0}"),
        ]
    return common + [
        (r"vision\.patch_embed\.bias", "{vision}patch_embed.proj.bias"),
        (r"vision\.pos_embed\.weight", "{vision}pos_embed.weight"),
        (layer + r"mlp\.(fc1|fc2)\.(weight|bias)", blk + "mlp.linear_{1}.{2}"),
        (r"projector\.deepstack\.(\d+)\.norm\.(weight|bias)", "{vision}deepstack_merger_list.{0}.norm.{1}"),
        (r"projector\.deepstack\.(\d+)\.(fc1|fc2)\.(weight|bias)", "{vision}deepstack_merger_list.{0}.linear_{1}.{2}"),
        (r"projector\.norm\.(weight|bias)", "{vision}merger.norm.{0}"),
        (r"projector\.(fc1|fc2)\.(weight|bias)", "{vision}merger.linear_{0}.{1}"),
    ]


def _prefixes(hf_names: Optional[Collection[str]], saved: dict) -> dict:
    found = {}
    for name in sorted(hf_names or ()):
        for key, suffix in _ANCHORS:
            if key not in found and name.endswith(suffix):
                found[key] = name[:-len(suffix)]
    return {**saved, **found}


def specialise(hf: dict, hf_names: Optional[Collection[str]] = None) -> Family:
    temporal = (hf.get("vision_config") or {}).get("temporal_patch_size", 2)
    return dataclasses.replace(QWEN_VL, rules=_vision_rules(temporal) + _text_rules(QWEN2),
                               prefixes=_prefixes(hf_names, SAVED_PREFIXES))


def specialise3(hf: dict, hf_names: Optional[Collection[str]] = None) -> Family:
    temporal = (hf.get("vision_config") or {}).get("temporal_patch_size", 2)
    return dataclasses.replace(QWEN3_VL, rules=_vision_rules(temporal, True) + _text_rules(QWEN3),
                               prefixes=_prefixes(hf_names, SAVED_PREFIXES3))


# ----------------------------------------------------------------------------- config


def _text_section(hf: dict) -> tuple[dict, str]:
    """(the text model's keys, how errors name their section): nested (transformers 5) or top-level (older)."""
    if hf.get("text_config"):
        return hf["text_config"], "text_config."
    return {k: v for k, v in hf.items() if k != "vision_config"}, ""


def _mrope(text: dict, where: str, default_sections: list[int]) -> tuple[list[int], float]:
    key = "rope_parameters" if text.get("rope_parameters") else "rope_scaling"
    params = text.get(key) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConversionError(f"config.json: {where}{key}.rope_type={kind!r} is not supported (only M-RoPE)")
    theta = text.get("rope_theta") or params.get("rope_theta") or 1000000.0
    return list(params.get("mrope_section", default_sections)), float(theta)


def _vision_from_hf(hf: dict, llm_hidden: int, qwen3: bool = False) -> VisionConfig:
    given = hf.get("vision_config") or {}
    try:
        require(given, _VISION_REQUIRED)
    except MissingKeys as e:
        raise MissingKeys(e.keys, "vision_config.") from None
    v = {**(_VISION_DEFAULTS3 if qwen3 else _VISION_DEFAULTS), **given}
    act = "gelu_pytorch_tanh" if qwen3 else "silu"
    for key, want in (("hidden_act", act), ("in_channels", 3), ("out_hidden_size", llm_hidden)):
        if v.get(key, want) != want:
            raise ConversionError(f"config.json: vision_config.{key}={v[key]!r} is not supported (only {want!r}"
                                  + (", the text hidden_size)" if key == "out_hidden_size" else ")"))
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConversionError(f"config.json: vision_config.rope_parameters.rope_type={rope['rope_type']!r} is not "
                              "supported (only axial)")
    common = dict(enabled=True, patch_size=v["patch_size"], hidden_size=v["hidden_size"],
                  intermediate_size=v["intermediate_size"], num_layers=v["depth"], num_heads=v["num_heads"], eps=1e-6,
                  o_bias=True, temporal_patch_size=v["temporal_patch_size"], spatial_merge_size=v["spatial_merge_size"],
                  rope_theta=float(rope.get("rope_theta", 10000.0)))
    if qwen3:
        return VisionConfig(**common, arch="qwen3_vl", norm="layernorm", mlp="gelu", patch_bias=True,
                            num_position_embeddings=v["num_position_embeddings"],
                            deepstack_visual_indexes=list(v["deepstack_visual_indexes"]))
    return VisionConfig(**common, arch="qwen2_5_vl", norm="rmsnorm", mlp="swiglu", patch_bias=False,
                        window_size=v["window_size"], fullatt_block_indexes=list(v["fullatt_block_indexes"]),
                        tokens_per_second=float(v["tokens_per_second"]))


def qwen_vl_from_hf(hf: dict, qwen3: bool = False) -> ModelConfig:
    text, where = _text_section(hf)
    sections, theta = _mrope(text, where, [24, 20, 20] if qwen3 else [16, 24, 24])
    plain = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_theta")}
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    if qwen3 and plain.get("attention_bias"):  # Qwen3-VL's flag biases o_proj too, which Loom's attention lacks
        raise ConversionError(f"config.json: {where}attention_bias=true is not supported for {ARCH3}")
    try:
        cfg = (QWEN3 if qwen3 else QWEN2).config_from_hf(plain)
    except MissingKeys as e:
        raise MissingKeys(e.keys, where) from None
    except ConversionError as e:  # name the section the key sits in
        raise ConversionError(str(e).replace("config.json: ", f"config.json: {where}", 1)) from None
    if not qwen3:
        cfg.head_dim = None  # transformers' Qwen2.5-VL ignores head_dim: always hidden_size / heads
    cfg.mrope_section, cfg.mrope_interleaved = sections, qwen3  # transformers' Qwen3-VL always interleaves
    cfg.vision = _vision_from_hf(hf, cfg.hidden_size, qwen3)
    cfg.image_token_id = int(hf.get("image_token_id", 151655))
    cfg.video_token_id = int(hf.get("video_token_id", 151656))
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    return cfg


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def qwen_vl_to_hf(cfg: ModelConfig, base: dict, qwen3: bool = False) -> dict:
    v, arch = cfg.vision, ARCH3 if qwen3 else ARCH
    refuse(cfg, arch, vision__enabled=not v.enabled, vision__arch=v.arch != ("qwen3_vl" if qwen3 else "qwen2_5_vl"),
           mrope_section=cfg.mrope_section is None, mrope_interleaved=cfg.mrope_interleaved != qwen3,
           image_token_id=cfg.image_token_id is None, video_token_id=cfg.video_token_id is None,
           head_dim=not qwen3 and cfg.head_dim not in (None, cfg.hidden_size // cfg.num_heads),
           attention_bias=qwen3 and cfg.attention_bias)
    text_base, _ = _text_section(base) if base else ({}, "")
    text = (QWEN3 if qwen3 else QWEN2).config_to_hf(cfg, {k: x for k, x in text_base.items() if k != "architectures"})
    for key in ("architectures", "rope_theta", "use_sliding_window") + (() if qwen3 else ("head_dim",)):
        if key not in text_base:
            text.pop(key, None)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": list(cfg.mrope_section)}
    if qwen3:
        rope["mrope_interleaved"] = True
    text.update(model_type="qwen3_vl_text" if qwen3 else "qwen2_5_vl_text", rope_parameters=rope)
    vision = {k: x for k, x in (base.get("vision_config") or {}).items() if k not in ("torch_dtype", "dtype")}
    vision.update(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, out_hidden_size=cfg.hidden_size, in_channels=3,
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    if qwen3:
        vision.update(model_type="qwen3_vl_vision", hidden_act="gelu_pytorch_tanh",
                      num_position_embeddings=v.num_position_embeddings,
                      deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    else:
        vision.update(model_type="qwen2_5_vl_vision", hidden_act="silu", window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes),
                      tokens_per_second=_number(v.tokens_per_second))
    moved = set(text) if base and "text_config" not in base else set()  # a top-level text section moves down
    out = {k: x for k, x in base.items() if k not in moved | {"torch_dtype", "text_config", "vision_config"}}
    out.update(architectures=[arch], model_type="qwen3_vl" if qwen3 else "qwen2_5_vl", text_config=text,
               vision_config=vision, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
               tie_word_embeddings=cfg.tie_embeddings)
    return out


QWEN_VL = Family("Qwen2.5-VL", (ARCH,), qwen_vl_from_hf, qwen_vl_to_hf, _vision_rules(2) + _text_rules(QWEN2),
                 SAVED_PREFIXES, specialise)
QWEN3_VL = Family("Qwen3-VL", (ARCH3,), lambda hf: qwen_vl_from_hf(hf, True),
                  lambda cfg, base: qwen_vl_to_hf(cfg, base, True), _vision_rules(2, True) + _text_rules(QWEN3),
                  SAVED_PREFIXES3, specialise3)
