"""The only place where the model meets parallelism.

``parallelize(model, groups, cfg)`` swaps the single-device linears and embedding for their
tensor-parallel versions, slicing the weights the model was built with (every rank builds it
from the same seed, so any layout starts from identical weights), and marks the parameters
whose gradients need a reduction over TP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.config import Config
from engine.model.decoder import Transformer
from engine.parallel import comm
from engine.parallel.mesh import ParallelGroups
from engine.parallel.tensor_parallel import (
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
    if comm.group_size(tp) == 1:
        return model
    enter = "gather" if sp else "copy"
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, tp, sequence_parallel=sp)
    for block in model.layers.values():
        _parallelize_attention(block.attn, tp, sp)
        _parallelize_mlp(block.mlp, tp, sp)
        if sp:  # norms run on this rank's token slice
            mark(block.attn_norm.weight, partial=True)
            mark(block.mlp_norm.weight, partial=True)
    if sp:
        mark(model.norm.weight, partial=True)
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, tp, input_mode=enter)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


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


def full_state_dict(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Every parameter at its full (unsharded) shape, identical on all ranks. Collective over TP."""
    out = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tensor = param.detach()
        dim = getattr(param, "tp_dim", None)
        if dim is not None:
            tensor = comm.all_gather(tensor, groups.tp, dim)
        out[name] = tensor.clone()
    return out


def full_grads(model: nn.Module, groups: ParallelGroups) -> dict[str, torch.Tensor]:
    """Like ``full_state_dict`` but for ``param.grad`` (after the gradient reductions)."""
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach()
        dim = getattr(param, "tp_dim", None)
        if dim is not None:
            grad = comm.all_gather(grad, groups.tp, dim)
        out[name] = grad.clone()
    return out


def check_replicas_in_sync(model: nn.Module, group, atol: float = 0.0) -> None:
    """Raise if a parameter differs across ``group`` (replicas that drift apart are a silent bug)."""
    if comm.group_size(group) == 1:
        return
    for name, param in model.named_parameters():
        ref = param.detach().clone()
        dist.broadcast(ref, src=dist.get_global_rank(group, 0), group=group)
        if not torch.allclose(ref, param.detach(), atol=atol, rtol=0):
            raise AssertionError(f"parameter {name} differs across ranks {dist.get_process_group_ranks(group)}")
