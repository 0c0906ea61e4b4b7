"""The model's declared surface: what each module says about its own parts, as plain data.

Every pass that transforms a built model reads these declarations: tensor, context and expert
parallelism (engine/parallel/parallelize.py), LoRA and NF4 (lora.py), recompute (recompute.py) and
the pipeline split (engine/parallel/pipeline.py). None of them looks a part up by attribute name or
by class, so a new block type is one ``surface()`` method: its projections' roles, its adapter
targets, its recompute points and its cache slots. Nothing here imports parallel code, in the way
torchtitan's per-model sharding plans stay plain data.

Roles of a projection (a module's ``nn.Linear`` / ``nn.Embedding`` child):

- ``column``: split by output features. The column projections of one module read the same input,
  so tensor parallelism makes that input enter the TP region once, before all of them.
- ``row``: split by input features; the partial sums are reduced over TP (reduce-scattered under SP).
- ``vocab``: an embedding split by vocabulary rows.
- ``head``: the LM head, column-parallel and entering the TP region on its own.
- ``replicated``: every rank holds the whole weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch.nn as nn

COLUMN, ROW, VOCAB, HEAD, REPLICATED = "column", "row", "vocab", "head", "replicated"
ROLES = (COLUMN, ROW, VOCAB, HEAD, REPLICATED)
ADAPTABLE = (COLUMN, ROW, REPLICATED)  # the linears LoRA may wrap; NF4 stores column and row ones


@dataclass(frozen=True)
class Surface:
    """One module's declaration; every name is one of the module's own children (or methods).

    ``projections``: part -> role (see the module docstring); a part that is None is skipped.
    ``adapters``: part -> the ``finetune.lora.target_modules`` name that selects it. A selected projection
    gets an adapter; a selected module has every projection below it adapted. A declared part whose
    target is not selected is not entered at all, so its inner declarations do not apply.
    ``head_norms``: norms applied per head, shared by all heads: each TP rank's gradient is partial.
    ``sequence_norms``: norms over the hidden size of each token: partial under SP (a token slice).
    ``token_sliced``: replicated weights that read this rank's token slice under TP (MoE's router).
    ``blocks``: the ModuleDict of blocks, keyed by global layer index (a decoder or a tower).
    ``first`` / ``last``: the parts only the first / last pipeline stage holds.
    ``language``: the part that is the language model (a VLM's decoder); None: the module is one.
    ``whole_input``: parts that every rank runs on whole inputs (a vision tower): no SP, no CP.
    ``sequence_entry``: a slot that, under SP, cuts the spliced input embeddings into this rank's
    slice; the embedding below then stays whole.
    ``attention_core``: the part that computes attention; context parallelism swaps it.
    ``experts``: the part holding stacked routed experts (sharded over ep x etp).
    ``stacked``: this module's own stacked expert weights ``[E, out, in]`` -> role (``column``: F is ``out``,
    ``row``: F is ``in``, ``replicated``: no F, whole on every etp rank); expert parallelism splits E, and F
    over etp; LoRA and NF4 treat them per expert.
    ``stacked_adapters``: the slot (a ModuleDict) where LoRA puts the adapter of each stacked weight,
    keyed by that weight's name; an adapter declares its own stacked factors.
    ``ties``: ``(a, b)`` pairs of parts that share one weight (``a.weight`` is ``b.weight``): tied embeddings.
    ``recompute``: this module's methods whose outputs selective recompute drops and recomputes.
    ``cache``: the cache slots a generation engine fills (``"kv"``: one key/value pair per token).
    """

    projections: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, str] = field(default_factory=dict)
    head_norms: tuple[str, ...] = ()
    sequence_norms: tuple[str, ...] = ()
    token_sliced: tuple[str, ...] = ()
    blocks: Optional[str] = None
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()
    language: Optional[str] = None
    whole_input: tuple[str, ...] = ()
    sequence_entry: Optional[str] = None
    attention_core: Optional[str] = None
    experts: Optional[str] = None
    stacked: dict[str, str] = field(default_factory=dict)
    stacked_adapters: Optional[str] = None
    ties: tuple[tuple[str, str], ...] = ()
    recompute: tuple[str, ...] = ()
    cache: tuple[str, ...] = ()

    def __post_init__(self):
        for name, role in self.projections.items():
            if role not in ROLES:
                raise ValueError(f"projection {name!r} has role {role!r}; roles are {', '.join(ROLES)}")


NOTHING = Surface()


def surface_of(module: nn.Module) -> Surface:
    """What ``module`` declares (``module.surface()``); a module that declares nothing has no surface."""
    declare = getattr(type(module), "surface", None)
    return declare(module) if callable(declare) else NOTHING


def part(module: nn.Module, name: str):
    """A declared part (None where the module has none of it, e.g. a stage without the LM head)."""
    return getattr(module, name, None)


def set_part(module: nn.Module, name: str, value) -> None:
    """Replace a declared part (a projection by its parallel version, a core by its CP version, a weight
    Parameter by its NF4 form)."""
    if isinstance(value, nn.Module) and isinstance(getattr(module, name, None), nn.Parameter):
        delattr(module, name)  # torch refuses a module in a Parameter's slot until the Parameter is gone
    setattr(module, name, value)


def parts(module: nn.Module, names) -> Iterator[tuple[str, object]]:
    """``(name, part)`` for each of ``names`` that this module holds."""
    for name in names:
        value = part(module, name)
        if value is not None:
            yield name, value


def declared(root: nn.Module) -> Iterator[tuple[nn.Module, Surface]]:
    """Every module under ``root`` (itself included) with its surface, parents before children."""
    for module in root.modules():
        s = surface_of(module)
        if s is not NOTHING:
            yield module, s


def language_model(model: nn.Module) -> nn.Module:
    """The decoder inside ``model`` (a VLM's language model), or ``model`` itself."""
    s = surface_of(model)
    return part(model, s.language) if s.language is not None else model


def has_language_part(model: nn.Module) -> bool:
    """Whether ``model`` wraps its decoder (a VLM) rather than being one."""
    return surface_of(model).language is not None


def blocks(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder's blocks this module holds, by global layer index, in order."""
    s = surface_of(model)
    holder = part(model, s.blocks) if s.blocks is not None else None
    if holder is None:
        return {}
    return dict(sorted((int(k), v) for k, v in holder.items()))


def tower_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every whole-input part (a VLM's vision tower), in order."""
    out = []
    for _, tower in parts(model, surface_of(model).whole_input):
        out += list(blocks(tower).values())
    return out


def routed_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The modules that route to stacked experts, by the global index of the block holding them."""
    found = {}
    for i, block in blocks(language_model(model)).items():
        for module, s in declared(block):
            if s.experts is not None:
                found[i] = module
    return found


def add_stacked_adapter(module: nn.Module, name: str, adapter: nn.Module) -> None:
    """Put ``adapter`` in ``module``'s declared slot for the adapter of its stacked weight ``name``."""
    s = surface_of(module)
    slot = part(module, s.stacked_adapters) if s.stacked_adapters is not None else None
    if slot is None or name not in s.stacked:
        raise TypeError(f"{type(module).__name__} declares no adapter slot for a stacked weight {name!r}")
    slot[name] = adapter


def adapter_sites(root: nn.Module, targets) -> Iterator[tuple[nn.Module, str, str]]:
    """``(owner, part name, role)`` of each projection the LoRA ``targets`` select; role ``stacked`` for
    a module of stacked experts (its ``stacked`` weights are adapted per expert)."""
    yield from _sites(root, set(targets), selected=False)


def _sites(module: nn.Module, targets: set, selected: bool):
    s = surface_of(module)
    if selected and s.stacked:
        yield module, "", "stacked"
        return
    for name, child in module.named_children():
        target = s.adapters.get(name)
        if target is None:
            yield from _sites(child, targets, selected)
        elif selected or target in targets:
            role = s.projections.get(name)
            if role in ADAPTABLE:
                yield module, name, role
            elif role is None:
                yield from _sites(child, targets, True)
