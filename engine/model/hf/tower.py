"""A CLIP or SigLIP vision tower on its own, imported into a Loom VLM (``convert_hf.py import --vision-from``).

The HF directory holds a ``CLIPVisionModel`` / ``SiglipVisionModel`` or a whole ``CLIPModel`` /
``SiglipModel``, whose vision half is taken. Its config becomes ``model.vision`` with ``arch`` clip
or siglip, whose presets (engine/config/model.py) are exactly transformers' towers; the weights map
by LLaVA's CLIP names (engine/model/hf/llava.py) under the prefix the checkpoint uses, plus SigLIP's
patch-embedding bias. What a contrastive model adds beyond the patch features (the text model, the
projections, SigLIP's attention-pooling head, the logit scale) is not a VLM's and is left behind.

The tower joins the base model's LLM; the projector between them is new, sized from the tower's
width to the LLM's and initialised as Loom initialises one, so training starts it from scratch
(``finetune.freeze: [vision, llm]`` trains it alone, LLaVA's first stage).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import torch

from loom.config import ConfigError, ModelConfig, VisionConfig
from loom.model.hf.llava import _vision_rules
from loom.model.hf.naming import ConversionError, Family, WeightMap, check_hf_names, expected_tensors

# name -> (Loom shape, dtype, a function that reads the tensor): what an import writes
Tensors = dict[str, tuple[tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]]

_ARCHS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_WHOLE = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}  # a full model's vision_config type
_ACTS = {"clip": "quick_gelu", "siglip": "gelu_pytorch_tanh"}  # the tower's hidden_act, which the preset implies
_DEFAULTS = {  # transformers' defaults for keys a config.json may leave out
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   num_channels=3),
}
_ANCHOR = "embeddings.patch_embedding.weight"
RULES = [r for r in _vision_rules() if r[0].startswith(r"vision\.")]
# Beside the tower's own names: the pooling head (SigLIP), and what a whole contrastive model holds.
_LEFT_BEHIND = re.compile(r"head\..*")


def tower_config(hf: dict) -> VisionConfig:
    """``model.vision`` of a CLIP / SigLIP vision config (or of a whole model's ``vision_config``)."""
    kind, where = hf.get("model_type"), ""
    if kind in _WHOLE:
        hf, where = hf.get("vision_config") or {}, "vision_config."
        kind = hf.get("model_type", _WHOLE[kind])
    if kind not in _ARCHS:
        raise ConversionError(f"config.json: {where}model_type={kind!r} is not a supported vision tower "
                              f"(supported: {', '.join(_ARCHS)}, or the whole models {', '.join(_WHOLE)})")
    arch = _ARCHS[kind]
    v = {**_DEFAULTS[arch], **{k: x for k, x in hf.items() if x is not None}}
    if v["hidden_act"] != _ACTS[arch]:
        raise ConversionError(f"config.json: {where}hidden_act={v['hidden_act']!r} is not supported for a {kind} "
                              f"tower (only {_ACTS[arch]!r})")
    if v["num_channels"] != 3:
        raise ConversionError(f"config.json: {where}num_channels={v['num_channels']} is not supported (only 3)")
    try:
        cfg = VisionConfig(enabled=True, arch=arch, image_size=v["image_size"], patch_size=v["patch_size"],
                           hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                           num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                           eps=float(v["layer_norm_eps"]))
        cfg.validate()
    except ConfigError as e:
        raise ConversionError(f"config.json: {where}: {e}") from None
    return cfg


def _prefix(names, where: str) -> str:
    found = sorted(n[:-len(_ANCHOR)] for n in names if n.endswith(_ANCHOR))
    if len(found) != 1:
        raise ConversionError(f"{where}: {'no' if not found else 'more than one'} vision tower weight "
                              f"*{_ANCHOR} ({', '.join(found)})")
    return found[0]


def tower_map(hf: dict, index: dict, where: str) -> tuple[VisionConfig, WeightMap]:
    """The tower's config and where its ``vision.*`` tensors are in ``index`` (HF name -> (shape, dtype, file)),
    every name and shape checked before any tensor is read."""
    vcfg = tower_config(hf)
    prefix = _prefix(index, where)
    family = Family("CLIP/SigLIP vision tower", tuple(_ARCHS), None, None, RULES, {"vision": prefix})
    loom_to_hf, shapes, reshaped = {}, {}, {}
    for name, tensor in expected_tensors(ModelConfig(vision=vcfg)).items():
        if name.startswith("vision."):
            loom_to_hf[name] = family.hf_names(name, tensor.shape)[0]
            shapes[name] = tuple(tensor.shape)
            if family.hf_shape(name, tensor.shape) is not None:
                reshaped[name] = family.hf_shape(name, tensor.shape)
    wmap = WeightMap(loom_to_hf, set(), shapes, reshaped)
    own = {n: e for n, e in index.items() if n.startswith(prefix) and not _LEFT_BEHIND.fullmatch(n[len(prefix):])}
    check_hf_names(wmap, own, False, where)
    return vcfg, wmap


def with_tower(cfg: ModelConfig, base: Tensors, vcfg: VisionConfig, tower: Tensors, where: str,
               seed: int = 0) -> tuple[ModelConfig, Tensors]:
    """The base model (a text LLM, or a VLM whose tower and projector are replaced) with ``tower`` and a
    new projector from the tower's width to the LLM's."""
    if cfg.vision.enabled:
        llm = {k: t for k, t in base.items() if k.startswith("llm.")}
    else:  # a text model's tensors become the VLM's LLM
        llm = {f"llm.{k}": t for k, t in base.items()}
    out_cfg = dataclasses.replace(cfg, vision=vcfg)
    out_cfg.validate()
    dtype = llm["llm.embed.weight"][1]
    projector = _new_projector(out_cfg, seed, dtype)
    tensors = {**llm, **tower, **projector}
    want = {k: tuple(v.shape) for k, v in expected_tensors(out_cfg).items()}
    got = {k: t[0] for k, t in tensors.items()}
    if want != got:  # the pieces must be exactly the VLM's tensors
        odd = sorted(set(want.items()) ^ set(got.items()))
        raise ConversionError(f"{where}: the VLM's tensors do not fit together, first {odd[0]}")
    return out_cfg, tensors


def _new_projector(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> Tensors:
    from loom.model.init import initialize_full
    from loom.model.vision import Projector

    projector = Projector(cfg.vision, cfg.hidden_size)
    initialize_full(projector, seed, cfg.init_std)
    return {f"projector.{k}": (tuple(v.shape), dtype, lambda v=v: v.detach().to(dtype))
            for k, v in projector.state_dict().items()}
