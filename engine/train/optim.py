"""AdamW with fp32 master weights, optionally sharded over data parallel; the LR schedule; exact clipping.

Megatron's mixed-precision optimizer, and its distributed variant:

- ``train.dtype=bf16``: parameters and compute in bf16, gradients accumulated in fp32 (the
  GradBuffer's buckets), and fp32 master weights plus both Adam moments here. After each step the
  masters are copied (rounded) into the bf16 parameters. With fp32 parameters the master *is* the
  parameter: no copy is kept.
- ``optim.distributed``: this rank keeps masters and moments only for its shard of every bucket
  (1/dp of the dense weights, 1/edp of the expert weights); gradients arrive reduce-scattered and
  the updated parameters leave all-gathered (GradBuffer.all_gather_params).

Bytes per parameter, as in Megatron's table: fp32 4 + 4 + 8/d, bf16 2 + 4 + 12/d (d = 1 without
the distributed optimizer). The optimizer works on ``Piece``s, each parameter's part of this rank's
shard, as flat fp32 tensors; torch's fused AdamW does the arithmetic.
"""
from __future__ import annotations

import math
import torch
import torch.distributed as dist
import torch.nn as nn

from loom.compat import foreach_mul_, foreach_norm
from loom.config import OptimConfig
from loom.parallel import comm
from loom.parallel.data_parallel import GradBuffer, Piece
from loom.parallel.sharding import counts_in_norm, spec_of


class MixedPrecisionAdamW:
    """AdamW over this rank's pieces of a ``GradBuffer``; ``groups`` (a ParallelGroups, None at
    world size 1) says over which ranks the gradient norm sums."""

    def __init__(self, grads: GradBuffer, cfg: OptimConfig, groups=None):
        self.grads, self.cfg, self.groups = grads, cfg, groups
        self.pieces: list[Piece] = grads.pieces()
        self.masters = [self._master(piece) for piece in self.pieces]
        # bf16 parameters: the masters are fp32 copies; fp32 parameters are their own masters.
        self.keeps_masters = any(p.bucket.param_data.dtype != torch.float32 for p in self.pieces)
        decay = [m for m, piece in zip(self.masters, self.pieces) if piece.param.dim() >= 2]
        no_decay = [m for m, piece in zip(self.masters, self.pieces) if piece.param.dim() < 2]
        param_groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (CPU and CUDA) is one pass over all tensors, about 5x faster on CPU than the
        # per-tensor loop; it is also what HF's Trainer picks by default on torch >= 2.8.
        fused = all(m.device.type in ("cpu", "cuda") for m in self.masters)
        param_groups = [g for g in param_groups if g["params"]]  # none: a rank whose shards hold only padding
        self.inner = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                       fused=fused or None) if param_groups else None
        self._states: list[dict] = []  # Adam's moments: allocated at the first step, as torch does
        self.num_steps = 0  # every rank counts, also one whose shards hold only padding

    @staticmethod
    def _master(piece: Piece) -> torch.Tensor:
        data = piece.bucket.param_data[piece.start:piece.end]
        return data if data.dtype == torch.float32 else data.float()  # fp32 params are their own masters

    @property
    def states(self) -> list[dict]:
        """Adam's state per piece, created on first use (the first step, or a checkpoint before it)."""
        if len(self._states) != len(self.masters):
            self._states = [self._state(m) for m in self.masters]
        return self._states

    def _state(self, master: torch.Tensor) -> dict:
        """Adam's state of ``master``, created as torch would at the first step."""
        state = self.inner.state[master]
        device = master.device if self.inner.defaults.get("fused") else "cpu"
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        state["exp_avg"] = torch.zeros_like(master)
        state["exp_avg_sq"] = torch.zeros_like(master)
        return state

    # ------------------------------------------------------------------ one step

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's reduced gradient, every element counted once.

        A TP shard counts on every TP rank, a TP-replicated parameter on TP rank 0 only, a tied
        embedding on the first stage only; DP replicas hold the same gradient and count once, or,
        with the distributed optimizer, each rank counts its shard. Expert weights are disjoint over
        the expert-model-parallel group (pp x ep x etp) and sharded or replicated over edp.
        """
        g = self.groups
        tp_rank = g.tp_rank if g is not None else 0
        dense = [self.grads.grad(p) for p in self.pieces
                 if not spec_of(p.param).expert and counts_in_norm(p.param, tp_rank)]
        # An expert tensor replicated over etp (a LoRA factor: its gradient is partial, then summed) counts once.
        etp_rank = g.etp_rank if g is not None else 0
        experts = [self.grads.grad(p) for p in self.pieces if spec_of(p.param).expert
                   and (etp_rank == 0 or not spec_of(p.param).tp_partial_grad)]
        device = self.grads.device
        dense_sq, expert_sq = _sum_of_squares(dense, device), _sum_of_squares(experts, device)
        if g is not None:
            for total, groups in ((dense_sq, (g.mp, g.dp_cp)), (expert_sq, (g.emp, g.edp))):
                for i, group in enumerate(groups):
                    if comm.group_size(group) > 1 and (i == 0 or self.grads.distributed):
                        dist.all_reduce(total, group=group)
        return (dense_sq + expert_sq).sqrt()

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        if max_norm <= 0:
            return
        coef = max_norm / (float(norm) + 1e-6)
        if coef < 1.0:
            foreach_mul_([self.grads.grad(p) for p in self.pieces], coef)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Update this rank's shards with the reduced gradients, then share the new parameters."""
        self.states  # noqa: B018 - created before torch would, so they are the ones checkpoints see
        for master, piece in zip(self.masters, self.pieces):
            master.grad = self.grads.grad(piece)
        if self.inner is not None:
            for group in self.inner.param_groups:
                group["lr"] = lr
            self.inner.step()
        self.num_steps += 1
        for master in self.masters:
            master.grad = None
        self.sync_params_from_masters()

    # ------------------------------------------------------------------ state

    def piece_states(self) -> list[tuple[Piece, dict[str, torch.Tensor]]]:
        """``(piece, {"exp_avg", "exp_avg_sq"[, "master"]: flat fp32 tensor})`` for checkpoints."""
        out = []
        for master, piece, state in zip(self.masters, self.pieces, self.states):
            tensors = {"exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            if self.keeps_masters:
                tensors["master"] = master
            out.append((piece, tensors))
        return out

    @property
    def step_count(self) -> torch.Tensor:
        """Adam's step counter (every piece's is the same), as a 0-d fp32 tensor."""
        return torch.tensor(float(self.num_steps))

    def set_step_count(self, value: torch.Tensor) -> None:
        self.num_steps = int(value)
        for state in self.states:
            state["step"].fill_(self.num_steps)

    @torch.no_grad()
    def masters_from_params(self) -> None:
        """After the parameters were set from outside (initialisation, a weights-only checkpoint)."""
        if not self.keeps_masters:
            return
        for master, piece in zip(self.masters, self.pieces):
            master.copy_(piece.bucket.param_data[piece.start:piece.end])

    @torch.no_grad()
    def sync_params_from_masters(self) -> None:
        """After a step or a load of the masters: round them into the parameters and share them."""
        if self.keeps_masters:
            for master, piece in zip(self.masters, self.pieces):
                piece.bucket.param_data[piece.start:piece.end].copy_(master)
        self.grads.all_gather_params()

    def state_bytes(self) -> int:
        """Bytes of what this optimizer holds once it has stepped: fp32 masters (when they are copies)
        and both moments. Counted from the shard sizes, so it is exact before the first step too."""
        numel = sum(m.numel() for m in self.masters)
        return numel * 4 * (3 if self.keeps_masters else 2)


def build_optimizer(model: nn.Module, cfg: OptimConfig, groups=None, *, distributed: bool = False,
                    bucket_size_mb: float = 25.0, device=None, tied=(None, None),
                    reduce_dtype: torch.dtype = torch.float32) -> MixedPrecisionAdamW:
    """The GradBuffer (``.grads``) over ``model``'s trainable parameters, and AdamW over its shards.

    Decay matrices; leave norms and biases (1-D parameters) undecayed, as Megatron does. At world
    size 1 (``groups`` None) nothing is reduced: ``opt.grads.finish(); opt.step(lr)`` after backward.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    g = groups
    grads = GradBuffer(params, g.dp_cp if g else None, g.tp if g else None, bucket_size_mb,
                       expert_dp_group=g.edp if g else None, device=device, distributed=distributed,
                       tied=tied, reduce_dtype=reduce_dtype)
    return MixedPrecisionAdamW(grads, cfg, groups)


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    """fp32 sum of squares of all ``grads`` (one foreach norm per tensor, as clip_grad_norm_ does)."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(foreach_norm(grads)).pow(2).sum()
