"""AdamW, the warmup + cosine learning rate, and clipping by a global gradient norm."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.compat import foreach_mul_, foreach_norm
from engine.config import OptimConfig
from engine.parallel import comm


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Decay matrices; leave norms and biases (1-D parameters) undecayed, as Megatron does."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) is one pass over all tensors, about 5x faster on CPU than the
    # per-tensor loop; it is also what HF's Trainer picks by default on torch >= 2.8.
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def global_grad_norm(params: list[nn.Parameter], norm_group, tp_rank: int, expert_group=None) -> torch.Tensor:
    """L2 norm of all gradients across the model-parallel group, counting no parameter twice.

    A TP-sharded parameter contributes its shard on every TP rank; a TP-replicated one only on
    TP rank 0. DP/CP replicas hold identical (already reduced) gradients and are not summed.
    A tied embedding held by the first and last pipeline stages counts on the first only.
    Expert parameters (``is_expert``) are disjoint shards over ``expert_group`` (pp x ep x etp)
    and replicated over the expert-data-parallel ranks: summed over that group instead.
    """
    device = params[0].device if params else torch.device("cpu")
    own, experts = [], []
    for p in params:
        if p.grad is None:
            continue
        if getattr(p, "is_expert", False):
            experts.append(p.grad)
        elif (getattr(p, "tp_dim", None) is not None or tp_rank == 0) and not getattr(p, "pp_tied_replica", False):
            own.append(p.grad)
    total, experts = (_sum_of_squares(grads, device) for grads in (own, experts))
    if comm.group_size(norm_group) > 1:
        dist.all_reduce(total, group=norm_group)
    if comm.group_size(expert_group) > 1:
        dist.all_reduce(experts, group=expert_group)
    return (total + experts).sqrt()


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    """fp32 sum of squares of all ``grads`` (one foreach norm per tensor, as clip_grad_norm_ does)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norms = foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.stack(norms).pow(2).sum()


def clip_grads(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    if max_norm <= 0:
        return
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        foreach_mul_([p.grad for p in params if p.grad is not None], coef)
