"""LLaVA 1.5 (``LlavaForConditionalGeneration``): a CLIP ViT, a Linear-GELU-Linear projector, a text decoder.

The tower may also be SigLIP's (``vision_config.model_type: siglip_vision_model``, as a tower swap
makes it): no class token, no pre-norm, a biased patch embedding, every patch kept
(``vision_feature_select_strategy: full``), read from a hidden state before ``post_layernorm``
as LLaVA reads any tower (Loom's ``model.vision.post_norm: false``).

Loom's VisionEncoder with CLIP's options is CLIP exactly: a class token, ``pre_layrnorm``,
quick-GELU, biased q/k/v/out projections, a bias-free Conv2d patch embedding (Loom's Linear,
reshaped on the way), and features read from hidden state ``vision_feature_layer`` (-2 in LLaVA
1.5), which comes before ``post_layernorm``: Loom keeps that norm as a weight but does not apply it.
The text model is any decoder family here (Llama in LLaVA 1.5), named under the language-model prefix.

Checkpoints place the submodules in three ways, all of which transformers 5 loads
(language model, head, vision tower, projector):

    Hub llava-hf    language_model.model  language_model.lm_head  vision_tower.vision_model  multi_modal_projector
    transformers 5  language_model.model  language_model.lm_head  vision_tower               multi_modal_projector
    state dict      model.language_model  lm_head                 model.vision_tower         model.multi_modal_projector

Import finds the prefixes from the weight names; export writes the names it imported, and the
Hub's layout (which transformers 4 reads too) for a model that was never imported.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Collection, Optional

from loom.config import ModelConfig, VisionConfig
from loom.model.hf.dense import LLAMA, QWEN2, QWEN3, refuse
from loom.model.hf.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from loom.model.hf.naming import ConversionError, Family, MissingKeys

ARCH = "LlavaForConditionalGeneration"
TEXT_FAMILIES = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE,
                 "qwen3_moe": QWEN3_MOE}
HUB_PREFIXES = {"lm": "language_model.model.", "head": "language_model.", "vision": "vision_tower.vision_model.",
                "proj": ""}
# Names that fix each prefix: (prefix key, suffix); the prefix is what precedes the suffix.
_ANCHORS = [("lm", "embed_tokens.weight"), ("lm", "layers.0.input_layernorm.weight"), ("head", "lm_head.weight"),
            ("vision", "embeddings.patch_embedding.weight"), ("vision", "embeddings.class_embedding"),
            ("proj", "multi_modal_projector.linear_1.weight")]

# transformers' defaults for keys a config.json may leave out (the Hub's llava-1.5 configs do).
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, rms_norm_eps=1e-6)
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
_LLAVA_VISION_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14)
_SIGLIP_DEFAULTS = dict(_CLIP_DEFAULTS, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
_ACTS = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu"}  # HF hidden_act -> model.vision.mlp
_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}


def _vision_rules() -> list:
    layer = r"vision\.layers\.(\d+)\."
    enc = "{vision}encoder.layers.{0}."

    def conv_shape(shape):  # Linear [out, 3*p*p] <-> Conv2d [out, 3, p, p]
        p = math.isqrt(shape[1] // 3)
        return shape[0], 3, p, p

    return [
        (r"vision\.class_embed", "{vision}embeddings.class_embedding"),
        (r"vision\.patch_embed\.weight", "{vision}embeddings.patch_embedding.weight", conv_shape),
        (r"vision\.patch_embed\.bias", "{vision}embeddings.patch_embedding.bias"),
        (r"vision\.pos_embed", "{vision}embeddings.position_embedding.weight"),
        (r"vision\.pre_norm\.(weight|bias)", "{vision}pre_layrnorm.{0}"),
        (layer + r"attn\.(q_proj|k_proj|v_proj)\.(weight|bias)", enc + "self_attn.{1}.{2}"),
        (layer + r"attn\.o_proj\.(weight|bias)", enc + "self_attn.out_proj.{1}"),
        (layer + r"attn_norm\.(weight|bias)", enc + "layer_norm1.{1}"),
        (layer + r"mlp\.(fc1|fc2)\.(weight|bias)", enc + "mlp.{1}.{2}"),
        (layer + r"mlp_norm\.(weight|bias)", enc + "layer_norm2.{1}"),
        (r"vision\.norm\.(weight|bias)", "{vision}post_layernorm.{0}"),
        (r"projector\.fc1\.(weight|bias)", "{proj}multi_modal_projector.linear_1.{0}"),
        (r"projector\.fc2\.(weight|bias)", "{proj}multi_modal_projector.linear_2.{0}"),
    ]


def _text_rules(text: Family) -> list:
    out = []
    for pattern, template, *rest in text.rules:
        if template.startswith("model."):
            template = "{lm}" + template[len("model."):]
        elif template.startswith("lm_head."):
            template = "{head}" + template
        out.append((r"llm\." + pattern, template, *rest))
    return out


def _prefixes(hf_names: Optional[Collection[str]]) -> dict:
    found = {}
    for name in sorted(hf_names or ()):
        for key, suffix in _ANCHORS:
            if key not in found and name.endswith(suffix):
                found[key] = name[:-len(suffix)]
    return {**HUB_PREFIXES, **found}


def _text_family(hf: dict) -> Family:
    kind = (hf.get("text_config") or {}).get("model_type", "llama")
    if kind not in TEXT_FAMILIES:
        raise ConversionError(f"config.json: text_config.model_type={kind!r} is not supported for {ARCH} "
                              f"(supported: {', '.join(TEXT_FAMILIES)})")
    return TEXT_FAMILIES[kind]


def specialise(hf: dict, hf_names: Optional[Collection[str]] = None) -> Family:
    """The LLaVA family for one config (its text model) and one checkpoint's prefixes."""
    return dataclasses.replace(LLAVA, rules=_vision_rules() + _text_rules(_text_family(hf)),
                               prefixes=_prefixes(hf_names))


# ----------------------------------------------------------------------------- config


def _vision_from_hf(hf: dict) -> VisionConfig:
    given = hf.get("vision_config")
    kind = (given or {}).get("model_type", "clip_vision_model")
    if kind not in _TOWERS:
        raise ConversionError(f"config.json: vision_config.model_type={kind!r} is not supported for {ARCH} "
                              f"(only {', '.join(_TOWERS)})")
    if kind == "siglip_vision_model":
        return _siglip_from_hf({**_SIGLIP_DEFAULTS, **given}, hf)
    v = {**_CLIP_DEFAULTS, **(_LLAVA_VISION_DEFAULTS if given is None else given)}
    if v["hidden_act"] not in _ACTS:
        raise ConversionError(f"config.json: vision_config.hidden_act={v['hidden_act']!r} is not supported "
                              f"(only {', '.join(_ACTS)})")
    if v["num_channels"] != 3:
        raise ConversionError(f"config.json: vision_config.num_channels={v['num_channels']} is not supported (only 3)")
    layer, select = _feature_reading(hf)
    # CLIP exactly, unless its activation is not CLIP's: then Loom's ViT with CLIP's other options
    arch = "clip" if v["hidden_act"] == "quick_gelu" else "vit"
    return VisionConfig(
        enabled=True, arch=arch, image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], norm="layernorm", mlp=_ACTS[v["hidden_act"]], merge=False,
        eps=float(v["layer_norm_eps"]), class_token=True, pre_norm=True, post_norm=False, patch_bias=False,
        o_bias=True, feature_layer=layer, feature_select=select)


def _feature_reading(hf: dict) -> tuple[int, str]:
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ConversionError(f"config.json: vision_feature_layer={layer!r} is not supported (only one layer)")
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise ConversionError(f"config.json: vision_feature_select_strategy={select!r} is not supported "
                              "(only default or full)")
    return layer, select


def _siglip_from_hf(v: dict, hf: dict) -> VisionConfig:
    """A SigLIP tower as LLaVA reads it: hidden state ``vision_feature_layer``, every patch."""
    layer, select = _feature_reading(hf)
    for key, value, want in (("vision_config.hidden_act", v["hidden_act"], "gelu_pytorch_tanh"),
                             ("vision_config.num_channels", v["num_channels"], 3),
                             ("vision_config.vision_use_head", v.get("vision_use_head", True), False),
                             ("vision_feature_select_strategy", select, "full")):
        if value != want:  # LLaVA never runs SigLIP's pooling head; "default" would drop a patch, not a class token
            raise ConversionError(f"config.json: {key}={value!r} is not supported for a SigLIP tower in {ARCH} "
                                  f"(only {want!r})")
    return VisionConfig(
        enabled=True, arch="siglip", image_size=v["image_size"], patch_size=v["patch_size"],
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], eps=float(v["layer_norm_eps"]), post_norm=False, feature_layer=layer,
        feature_select=select)


def llava_from_hf(hf: dict) -> ModelConfig:
    for key, want in (("projector_hidden_act", "gelu"), ("multimodal_projector_bias", True)):
        if hf.get(key, want) != want:
            raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported (only {want!r})")
    text = hf.get("text_config") or {}
    family = _text_family(hf)
    if family is LLAMA:
        text = {**_LLAMA_DEFAULTS, **text}
    try:
        cfg = family.config_from_hf(text)
    except MissingKeys as e:
        raise MissingKeys(e.keys, "text_config.") from None
    cfg.vision = _vision_from_hf(hf)
    cfg.image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 32000)))
    cfg.tie_embeddings = cfg.tie_embeddings or bool(hf.get("tie_word_embeddings", False))
    return cfg


def llava_to_hf(cfg: ModelConfig, base: dict) -> dict:
    v = cfg.vision
    siglip = v.arch == "siglip"
    refuse(cfg, ARCH, vision__enabled=not v.enabled, vision__arch=v.arch not in ("vit", "clip", "siglip"),
           vision__norm=v.norm != "layernorm", vision__mlp=v.mlp not in _ACTS.values(), vision__merge=v.merge,
           vision__class_token=v.class_token == siglip, vision__pre_norm=v.pre_norm == siglip,
           vision__patch_bias=v.patch_bias != siglip, vision__o_bias=not v.o_bias,
           image_token_id=cfg.image_token_id is None)
    if v.post_norm:
        raise ConversionError(f"model.vision.post_norm=True is not expressible as {ARCH}: it reads the tower's "
                              "hidden state model.vision.feature_layer before the final norm; train with "
                              "model.vision.post_norm=false")
    from loom.model.hf import family_for_model

    text_base = base.get("text_config") or {}
    text_family = _text_family(base) if text_base.get("model_type") else \
        family_for_model(dataclasses.replace(cfg, vision=VisionConfig()))
    text = text_family.config_to_hf(cfg, text_base)
    if "architectures" not in text_base:  # transformers 5 writes none in a sub-config
        text.pop("architectures")
    vision = {k: x for k, x in (base.get("vision_config") or {}).items() if k not in ("torch_dtype", "dtype")}
    if siglip:
        vision.update(vision_use_head=False)
    vision.update(model_type="siglip_vision_model" if siglip else "clip_vision_model", hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
                  num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, num_channels=3,
                  layer_norm_eps=v.eps, hidden_act={a: h for h, a in _ACTS.items()}[v.mlp])
    out = {k: x for k, x in base.items() if k not in ("torch_dtype", "text_config", "vision_config")}
    out.update(architectures=[ARCH], model_type="llava", text_config=text, vision_config=vision,
               image_token_index=cfg.image_token_id, vision_feature_layer=v.feature_layer,
               # without a class token both of Loom's values keep every patch; HF's "default" would drop one
               vision_feature_select_strategy="full" if siglip else v.feature_select, projector_hidden_act="gelu",
               multimodal_projector_bias=True, image_seq_length=v.tokens_per_image,
               tie_word_embeddings=cfg.tie_embeddings)
    return out


LLAVA = Family("LLaVA", (ARCH,), llava_from_hf, llava_to_hf, _vision_rules() + _text_rules(LLAMA), HUB_PREFIXES,
               specialise)
