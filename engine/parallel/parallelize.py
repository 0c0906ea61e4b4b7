"""The only place where the model meets parallelism.

``parallelize(model, groups, cfg)`` reads the model's declared surface (engine/model/surface.py) and
applies it: each ``column`` / ``row`` / ``vocab`` / ``head`` projection becomes its tensor-parallel
version, sliced from the weights the model was built with (every rank builds it from the same seed,
so any layout starts from identical weights), and the parameters whose gradients need a reduction
over TP are marked. Under context parallelism every declared attention core becomes a
``ContextParallelAttention`` (ring or Ulysses). Routed experts get their shards, the EP dispatcher
and the balancing scope from expert_parallel.py; a shared expert is tensor-parallel like a dense MLP.

A VLM's whole-input parts (the vision tower and projector) are TP-sharded the same way but without
SP or CP: image tokens are spliced into the full-sequence embeddings, so under SP the LLM embedding
stays unsplit (all-reduce) and the declared sequence entry cuts the spliced result into this rank's
slice. They are replicated over CP and DP, and their gradients are reduced over dp x cp like every
other replicated parameter. Under CP the trainer hands ``image_slots`` so each rank splices the
features of its own placeholder tokens (engine/train/multimodal.py).

``parallelize_stages`` first cuts the model into this rank's pipeline stages (pipeline.py), then
parallelizes each; a stage lacks the embedding / final norm / head it does not own.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from loom.config import Config
from loom.model import surface
from loom.model.surface import COLUMN, HEAD, ROW, VOCAB
from loom.parallel import comm
from loom.parallel.context_parallel import ContextParallelAttention
from loom.parallel.cp_plan import CommStats
from loom.parallel.expert_parallel import parallelize_moe
from loom.parallel.mesh import ParallelGroups
from loom.parallel.pipeline import split_stages, stage_layers
from loom.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    enter_tp_region,
    mark,
)


def parallelize(model: nn.Module, groups: ParallelGroups, cfg: Config) -> nn.Module:
    """Apply ``model``'s declared surface to this rank's layout (a decoder, a VLM, or a stage of either)."""
    for param in model.parameters():
        mark(param)
    language = surface.language_model(model)
    _parallelize_context(model, groups, cfg)
    parallelize_moe(language, groups, cfg)
    if comm.group_size(groups.tp) > 1:
        _shard(model, groups.tp, cfg.parallel.sp, cfg.parallel.sp)
    _tie(model)
    return model


def parallelize_stages(model: nn.Module, groups: ParallelGroups, cfg: Config) -> list[nn.Module]:
    """This rank's model chunks, each parallelized: ``[model]``, or its virtual pipeline stages.

    The split comes first, on the plain module; with tied embeddings the last stage's head
    starts from the same weight as the first stage's embedding (pipeline.py keeps them equal).
    A VLM's vision tower rides with the first stage.
    """
    p = cfg.parallel
    if p.pp == 1:
        return [parallelize(model, groups, cfg)]
    if surface.has_language_part(model):
        _check_deepstack_on_first_stage(model, p)
    chunks = split_stages(model, groups.pp_rank, p.pp, p.vpp, p.pp_layout)
    return [parallelize(chunk, groups, cfg) for chunk in chunks]


def _check_deepstack_on_first_stage(model: nn.Module, p) -> None:
    """DeepStack features join the LLM after its first layers; they are made next to the vision tower,
    on the first stage, and do not travel between stages, so those layers must all be there."""
    need = len(model.cfg.vision.deepstack_visual_indexes)
    first = len(stage_layers(len(model.llm.layers), p.pp, p.vpp, p.pp_layout)[0])
    if need > first:
        raise ValueError(f"model.vision.deepstack_visual_indexes adds features after LLM layers 0..{need - 1}, "
                         f"but the first pipeline stage holds {first} layer(s); give it at least {need} "
                         "(parallel.pp_layout)")


class _ScatterToSequence(nn.Module):
    """``[T, h] -> [T/tp, h]``: this rank's SP slice of the spliced embeddings (all-gather backward)."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return comm.scatter(x, self.group, 0)


def _enter_once(module: nn.Module, group, sp: bool) -> None:
    """q/k/v (and gate/up) read the same input: enter the TP region once for all of them."""
    mode = "gather" if sp else "copy"

    def hook(_module, args):
        return (enter_tp_region(args[0], group, mode), *args[1:])

    module.register_forward_pre_hook(hook)


def _shard(module: nn.Module, tp, sp: bool, embed_sp: bool) -> None:
    """Swap the declared projections of ``module`` and below for their TP versions."""
    s = surface.surface_of(module)
    if sp and s.sequence_entry is not None:  # spliced inputs: cut after the splice, not at the embedding
        surface.set_part(module, s.sequence_entry, _ScatterToSequence(tp))
        embed_sp = False
    _shard_projections(module, s, tp, sp, embed_sp)
    for _, norm in surface.parts(module, s.head_norms):  # shared over heads, and each TP rank holds different heads
        mark(norm.weight, partial=True)
    for _, norm in surface.parts(module, s.sequence_norms if sp else ()):  # run on this rank's token slice
        mark(norm.weight, partial=True)
    whole = set(s.whole_input)
    for name, child in list(module.named_children()):
        if name not in s.projections:
            _shard(child, tp, sp and name not in whole, embed_sp and name not in whole)


def _shard_projections(module: nn.Module, s: surface.Surface, tp, sp: bool, embed_sp: bool) -> None:
    columns = False
    for name, layer in list(surface.parts(module, s.projections)):
        role = s.projections[name]
        if role == COLUMN:
            layer, columns = ColumnParallelLinear.from_linear(layer, tp, input_mode="none"), True
        elif role == ROW:
            layer = RowParallelLinear.from_linear(layer, tp, sequence_parallel=sp)
        elif role == VOCAB:
            layer = VocabParallelEmbedding.from_embedding(layer, tp, sequence_parallel=embed_sp)
        elif role == HEAD:
            layer = ColumnParallelLinear.from_linear(layer, tp, input_mode="gather" if sp else "copy")
        else:
            continue
        surface.set_part(module, name, layer)
    if columns:
        _enter_once(module, tp, sp)


def _tie(model: nn.Module) -> None:
    """Re-tie declared shared weights after their holders were swapped (a stage may hold only one)."""
    for module, s in surface.declared(model):
        for a, b in s.ties:
            holder, source = surface.part(module, a), surface.part(module, b)
            if holder is not None and source is not None:
                holder.weight = source.weight


def _parallelize_context(model: nn.Module, groups: ParallelGroups, cfg: Config) -> None:
    """Under CP every attention of the sequence spans the CP group; they share one CommStats (``.stats``)."""
    if comm.group_size(groups.cp) == 1:
        return
    stats = CommStats()
    for module, s in _sequence_modules(model):
        if s.attention_core is not None:
            core = surface.part(module, s.attention_core)
            surface.set_part(module, s.attention_core, ContextParallelAttention(
                core.backend, core.causal, groups.cp, cfg.parallel.cp_mode, stats))


def _sequence_modules(module: nn.Module):
    """Declared modules that run on the (CP-split) token sequence: all but the whole-input parts."""
    s = surface.surface_of(module)
    yield module, s
    for name, child in module.named_children():
        if name not in s.whole_input:
            yield from _sequence_modules(child)
