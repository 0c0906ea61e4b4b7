"""How a family of HF checkpoints names Loom's tensors, and the checks both directions share.

A family is a list of rules ``(Loom regex, HF template)``. The template is formatted with the
regex groups and the family's ``prefixes`` (``{lm}``: where one checkpoint format puts a
submodule); a template containing ``{e}`` names one HF tensor per expert, and the Loom tensor
is their stack along dim 0 (HF keeps one ``[out, in]`` per expert, Loom ``[E, out, in]``).
A third element ``loom shape -> HF shape`` marks a tensor stored in another shape with the same
element order (a Conv2d patch embedding ``[out, 3, p, p]`` is Loom's Linear ``[out, 3*p*p]``), so
conversion is a reshape, exact for any dtype. A third element ``Fused`` marks Loom tensors that
are consecutive row blocks of one HF tensor (a ViT's fused ``qkv``: Loom keeps q/k/v apart, so TP
shards them like the LLM's); import slices, export concatenates. Loom keeps HF's layouts
otherwise (rotate-half RoPE, separate gate/up), so no rule transposes or permutes anything.

The expected set of names always comes from a Loom model built for the config (on the meta
device), so a weight that is missing or unexpected is found before any data is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Optional

import torch

from loom.config import ModelConfig

# HF names that carry no weights (derived buffers some exporters wrote).
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq")

# Attention, norms, embedding and head: the same in every family here.
COMMON_RULES = [
    (r"embed\.weight", "model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "model.layers.{0}.self_attn.{1}.{2}"),
    (r"layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight", "model.layers.{0}.self_attn.{1}.weight"),
    (r"layers\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
]
DENSE_MLP_RULES = [
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "model.layers.{0}.mlp.{1}.weight"),
]


@dataclass(frozen=True)
class Fused:
    """The Loom tensor is one row block of its HF tensor: regex group ``group`` names which, in ``order``."""

    group: int
    order: tuple[str, ...]


class ConversionError(ValueError):
    """An HF checkpoint or config Loom cannot convert; the message names the weight, key or file."""


class MissingKeys(ConversionError):
    """Required ``config.json`` keys that are absent or null; ``section`` prefixes them (``text_config.``)."""

    def __init__(self, keys: list[str], section: str = ""):
        self.keys, self.section = keys, section
        names = ", ".join(section + k for k in keys)
        super().__init__(f"config.json: {names} {'is' if len(keys) == 1 else 'are'} missing")


def require(hf: dict, keys) -> None:
    """Raise ``MissingKeys`` naming every key of ``keys`` that ``hf`` lacks, all at once.

    A key may be a tuple of spellings, any one of which will do (``num_experts`` / ``num_local_experts``).
    """
    missing = []
    for key in keys:
        spellings = key if isinstance(key, tuple) else (key,)
        if all(hf.get(k) is None for k in spellings):
            missing.append(spellings[0] + (f" (or {', '.join(spellings[1:])})" if len(spellings) > 1 else ""))
    if missing:
        raise MissingKeys(missing)


@dataclass(frozen=True)
class Family:
    """One HF architecture family: its names, and its config in both directions."""

    name: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig, dict], dict]  # (cfg, base HF config or {}) -> HF config
    rules: list = field(default_factory=list)
    prefixes: dict = field(default_factory=dict)  # template keywords: one checkpoint format's module prefixes
    # (HF config, HF weight names or None) -> the family for that checkpoint; None: always ``self``.
    specialise: Optional[Callable[[dict, Optional[Collection[str]]], "Family"]] = None

    def for_checkpoint(self, hf_config: dict, hf_names: Optional[Collection[str]] = None) -> "Family":
        """This family for one HF config, and on import the weight names found (LLaVA's rules depend on both)."""
        return self.specialise(hf_config, hf_names) if self.specialise else self

    def _rule(self, loom_name: str):
        for rule in self.rules:
            m = re.fullmatch(rule[0], loom_name)
            if m:
                return rule, m
        raise ConversionError(f"Loom tensor {loom_name!r} has no {self.name} name (architectures "
                              f"{', '.join(self.architectures)})")

    def hf_names(self, loom_name: str, shape) -> tuple[list[str], bool]:
        """(the HF tensors that make up Loom tensor ``loom_name``, whether they stack along dim 0)."""
        (_, template, *_), m = self._rule(loom_name)
        if "{e}" in template:
            return [template.format(*m.groups(), e=e, **self.prefixes) for e in range(shape[0])], True
        return [template.format(*m.groups(), **self.prefixes)], False

    def hf_shape(self, loom_name: str, shape) -> Optional[tuple[int, ...]]:
        """The HF shape of a tensor HF stores reshaped, else None."""
        rule, _ = self._rule(loom_name)
        return tuple(rule[2](tuple(shape))) if len(rule) > 2 and callable(rule[2]) else None

    def fused_part(self, loom_name: str) -> Optional[int]:
        """Which row block of its HF tensor the Loom tensor is (``Fused``), else None."""
        rule, m = self._rule(loom_name)
        if len(rule) > 2 and isinstance(rule[2], Fused):
            return rule[2].order.index(m.group(rule[2].group + 1))
        return None


def expected_tensors(cfg: ModelConfig, lora=None) -> dict[str, torch.Tensor]:
    """Loom name -> meta tensor for every tensor a model of ``cfg`` (with ``lora``'s adapters) has, named as
    checkpoints name them."""
    from loom.model.decoder import build_model
    from loom.model.lora import apply_lora
    from loom.model.vlm import build_vlm
    from loom.checkpoint.names import named_tensors

    with torch.device("meta"):
        model = build_vlm(cfg) if cfg.vision.enabled else build_model(cfg)
        if lora is not None:
            apply_lora(model, lora)
    return {k: v.detach() for k, v in named_tensors(model, cfg.tie_embeddings).items()}


@dataclass
class WeightMap:
    """Loom tensor -> the HF tensors it is made of, for one config, with the reverse lookup."""

    loom_to_hf: dict[str, list[str]]
    stacked: set[str]  # Loom tensors that are a stack of per-expert HF tensors
    shapes: dict[str, tuple[int, ...]]  # Loom shapes
    reshaped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # Loom name -> HF shape, where they differ
    fused: dict[str, list[str]] = field(default_factory=dict)  # HF name -> its row blocks' Loom names, in order

    @property
    def hf_to_loom(self) -> dict[str, tuple[str, int]]:
        """HF name -> (Loom name, position in the stack, -1 when not stacked); a fused one's first block."""
        out = {}
        for loom, hf in self.loom_to_hf.items():
            for i, name in enumerate(hf):
                out.setdefault(name, (loom, i if loom in self.stacked else -1))
        return out

    def hf_shape(self, loom: str, index: int) -> tuple[int, ...]:
        hf = self.loom_to_hf[loom][0]
        if hf in self.fused:
            parts = [self.shapes[n] for n in self.fused[hf]]
            return (sum(p[0] for p in parts), *parts[0][1:])
        shape = self.reshaped.get(loom, self.shapes[loom])
        return shape[1:] if index >= 0 else shape

    def rows(self, loom: str) -> Optional[tuple[int, int]]:
        """(first row, rows) of a fused Loom tensor within its HF tensor, else None."""
        hf = self.loom_to_hf[loom][0]
        if hf not in self.fused:
            return None
        names = self.fused[hf]
        start = sum(self.shapes[n][0] for n in names[:names.index(loom)])
        return start, self.shapes[loom][0]

    def to_loom(self, loom: str, tensor: torch.Tensor) -> torch.Tensor:
        rows = self.rows(loom)
        if rows is not None:
            return tensor[rows[0]:rows[0] + rows[1]].clone()
        return tensor.reshape(self.shapes[loom]) if loom in self.reshaped else tensor

    def to_hf(self, loom: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(self.reshaped[loom]) if loom in self.reshaped else tensor


def weight_map(family: Family, cfg: ModelConfig) -> WeightMap:
    loom_to_hf, stacked, shapes, reshaped, parts = {}, set(), {}, {}, {}
    for name, tensor in expected_tensors(cfg).items():
        loom_to_hf[name], is_stack = family.hf_names(name, tensor.shape)
        shapes[name] = tuple(tensor.shape)
        if is_stack:
            stacked.add(name)
        hf_shape = family.hf_shape(name, tensor.shape)
        if hf_shape is not None:
            reshaped[name] = hf_shape
        part = family.fused_part(name)
        if part is not None:
            parts.setdefault(loom_to_hf[name][0], {})[part] = name
    fused = {hf: [blocks[i] for i in sorted(blocks)] for hf, blocks in parts.items()}
    # A fused HF tensor's blocks stay together, so an export shard can hold all of them.
    order = []
    for name in loom_to_hf:
        group = fused.get(loom_to_hf[name][0], [name])
        if name == group[0] or name not in fused.get(loom_to_hf[name][0], ()):
            order.extend(group)
    loom_to_hf = {n: loom_to_hf[n] for n in order}
    shapes = {n: shapes[n] for n in order}
    return WeightMap(loom_to_hf, stacked, shapes, reshaped, fused)


def check_hf_names(wmap: WeightMap, found: dict[str, tuple], tie_embeddings: bool, where: str) -> None:
    """Every HF tensor expected and none unexpected, with the right shapes; errors name the weight.

    ``found``: HF name -> (shape, dtype, file). A tied model ignores a stored ``lm_head.weight``
    (some exporters write the tied copy; transformers ignores it too).
    """
    reverse = wmap.hf_to_loom
    for name, (shape, _dtype, _file) in found.items():
        if IGNORED_HF.fullmatch(name) or (tie_embeddings and name.endswith("lm_head.weight")):
            continue
        if name not in reverse:
            raise ConversionError(f"{where}: unexpected weight {name!r} (no Loom tensor takes it)")
        loom, index = reverse[name]
        want = wmap.hf_shape(loom, index)
        if tuple(shape) != want:
            raise ConversionError(f"{where}: weight {name!r} has shape {tuple(shape)}, expected {want} "
                                  f"(Loom {loom})")
    missing = [n for n in reverse if n not in found]
    if missing:
        raise ConversionError(f"{where}: missing weight {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
