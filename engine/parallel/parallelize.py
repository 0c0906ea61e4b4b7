"""The only place where the model meets parallelism.

``parallelize(model, groups, cfg)`` swaps the single-device linears and embedding for their
tensor-parallel versions, slicing the weights the model was built with (every rank builds it
from the same seed, so any layout starts from identical weights), and marks the parameters
whose gradients need a reduction over TP. Under context parallelism it also swaps every
``CoreAttention`` for ``ContextParallelAttention`` (ring or Ulysses). MoE layers get their
expert shards, the EP dispatcher and the balancing scope from expert_parallel.py; their shared
expert is tensor-parallel like a dense MLP.

``parallelize_stages`` first cuts the model into this rank's pipeline stages (pipeline.py), then
parallelizes each; a stage lacks the embedding / final norm / head it does not own.
"""
from __future__ import annotations


import torch
import torch.nn as nn

from loom.config import Config
from loom.model.decoder import Transformer
from loom.model.moe import MoE
from loom.model.vision import GeluMLP
from loom.model.vlm import VisionLanguageModel
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


def parallelize(model: Transformer, groups: ParallelGroups, cfg: Config) -> Transformer:
    tp, sp = groups.tp, cfg.parallel.sp
    for param in model.parameters():
        mark(param)
    _parallelize_context(model, groups, cfg)
    parallelize_moe(model, groups, cfg)
    if comm.group_size(tp) == 1:
        return model
    enter = "gather" if sp else "copy"
    if model.embed is not None:
        model.embed = VocabParallelEmbedding.from_embedding(model.embed, tp, sequence_parallel=sp)
    for block in model.layers.values():
        _parallelize_attention(block.attn, tp, sp)
        if not isinstance(block.mlp, MoE):
            _parallelize_mlp(block.mlp, tp, sp)
        elif block.mlp.shared_expert is not None:
            _parallelize_mlp(block.mlp.shared_expert, tp, sp)
        if sp:  # norms run on this rank's token slice
            mark(block.attn_norm.weight, partial=True)
            mark(block.mlp_norm.weight, partial=True)
    if sp and model.norm is not None:
        mark(model.norm.weight, partial=True)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, tp, input_mode=enter)
    if cfg.model.tie_embeddings and model.embed is not None and model.lm_head is not None:
        model.lm_head.weight = model.embed.weight
    return model


def parallelize_stages(model: Transformer, groups: ParallelGroups, cfg: Config) -> list[Transformer]:
    """This rank's model chunks, each parallelized: ``[model]``, or its virtual pipeline stages.

    The split comes first, on the plain module; with tied embeddings the last stage's head
    starts from the same weight as the first stage's embedding (pipeline.py keeps them equal).
    """
    p = cfg.parallel
    if isinstance(model, VisionLanguageModel):  # the vision tower rides with the first stage
        if p.pp == 1:
            return [parallelize_vlm(model, groups, cfg)]
        _check_deepstack_on_first_stage(model, p)
        chunks = split_stages(model.llm, groups.pp_rank, p.pp, p.vpp, p.pp_layout)
        return [parallelize_vlm(model.pipeline_stage(chunk), groups, cfg) for chunk in chunks]
    if p.pp == 1:
        return [parallelize(model, groups, cfg)]
    chunks = split_stages(model, groups.pp_rank, p.pp, p.vpp, p.pp_layout)
    return [parallelize(chunk, groups, cfg) for chunk in chunks]


def _check_deepstack_on_first_stage(model: VisionLanguageModel, p) -> None:
    """DeepStack features join the LLM after its first layers; they are made next to the vision tower,
    on the first stage, and do not travel between stages, so those layers must all be there."""
    need = len(model.cfg.vision.deepstack_visual_indexes)
    first = len(stage_layers(len(model.llm.layers), p.pp, p.vpp, p.pp_layout)[0])
    if need > first:
        raise ValueError(f"model.vision.deepstack_visual_indexes adds features after LLM layers 0..{need - 1}, "
                         f"but the first pipeline stage holds {first} layer(s); give it at least {need} "
                         "(parallel.pp_layout)")


def parallelize_vlm(model: VisionLanguageModel, groups: ParallelGroups, cfg: Config) -> VisionLanguageModel:
    """The LLM as ``parallelize``; the vision tower TP-sharded with the same helpers but without SP.

    Image tokens are spliced into the full-sequence embeddings, so under SP the LLM embedding
    stays unsplit (all-reduce) and ``seq_shard`` cuts the spliced result into this rank's slice.
    The vision tower and projector are replicated over CP and DP, and their gradients are
    reduced over dp x cp like every other replicated parameter. Under CP the trainer hands
    ``image_slots`` so each rank splices the features of its own placeholder tokens, and a
    native-resolution tower's M-RoPE positions, computed on the full microbatch and sharded like
    the tokens (engine/train/multimodal.py). Its window borders are the same on every TP rank
    (each runs all patches, with its heads); DeepStack rows go through ``seq_shard`` with the
    embeddings, and stay on the first pipeline stage.
    """
    parallelize(model.llm, groups, cfg)
    if model.vision is None:  # a later pipeline stage
        return model
    for param in (*model.vision.parameters(), *model.projector.parameters()):
        mark(param)
    tp = groups.tp
    if comm.group_size(tp) == 1:
        return model
    for block in model.vision.layers.values():
        _parallelize_attention(block.attn, tp, sp=False)
        if isinstance(block.mlp, GeluMLP):
            block.mlp.fc1 = ColumnParallelLinear.from_linear(block.mlp.fc1, tp, input_mode="copy")
            block.mlp.fc2 = RowParallelLinear.from_linear(block.mlp.fc2, tp)
        else:
            _parallelize_mlp(block.mlp, tp, sp=False)
    if cfg.parallel.sp:
        model.llm.embed.sequence_parallel = False
        model.seq_shard = _ScatterToSequence(tp)
    return model


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


def _parallelize_attention(attn: nn.Module, tp, sp: bool) -> None:
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), tp, input_mode="none"))
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, tp, sequence_parallel=sp)
    _enter_once(attn, tp, sp)
    if attn.q_norm is not None:  # shared over heads, and each TP rank holds different heads
        mark(attn.q_norm.weight, partial=True)
        mark(attn.k_norm.weight, partial=True)


def _parallelize_mlp(mlp: nn.Module, tp, sp: bool) -> None:
    mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, tp, input_mode="none")
    mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, tp, input_mode="none")
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, tp, sequence_parallel=sp)
    _enter_once(mlp, tp, sp)


def _parallelize_context(model: Transformer, groups: ParallelGroups, cfg: Config) -> None:
    """Under CP every attention spans the CP group; the layers share one CommStats (``.stats``)."""
    if comm.group_size(groups.cp) == 1:
        return
    stats = CommStats()
    for block in model.layers.values():
        core = block.attn.core
        block.attn.core = ContextParallelAttention(core.backend, core.causal, groups.cp, cfg.parallel.cp_mode, stats)
