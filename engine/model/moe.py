"""Mixture-of-Experts MLP: router, routed experts, shared expert. Single-device code: no process groups.

Parallelism comes in through two typed objects that the layer is built with (``MoEWiring``; for a
layout, engine/parallel/expert_parallel.py's ``moe_wiring``): a ``Dispatcher`` (here
``LocalDispatcher``; the EP all-to-all dispatcher there) and a ``Scope`` (here ``BalanceScope``:
which tokens share balancing statistics, and how one microbatch's share of the balancing losses
is normalised). Nothing reassigns them after the build.

Parameter names follow HF where cheap; routed experts are stacked ``[E, out, in]`` (one
``nn.Linear`` layout per expert), so HF's ``experts.N.gate_proj.weight`` (Mixtral ``w1``) is
``experts.gate_proj[N]``, ``up_proj`` is Mixtral's ``w3`` and ``down_proj`` its ``w2``::

    mlp.gate.weight                  [E, h]     router (Qwen ``mlp.gate``, Mixtral ``block_sparse_moe.gate``)
    mlp.gate.e_score_correction_bias [E]        buffer: selection-only bias (DeepSeek-V3)
    mlp.experts.{gate,up}_proj       [E, F, h]
    mlp.experts.down_proj            [E, h, F]
    mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight  (Qwen2-MoE)

**Balancing losses.** The Switch/GShard loss of a set S of tokens is
``E/(k |S|^2) * sum_e c_e(S) * sum_{t in S} p_te`` (c_e: assignments to expert e, p: router
probabilities; sigmoid scores are normalised per token first, as in DeepSeek-V3 and Megatron).
The sets (units) are layout independent:
- ``seq``: each sequence (a ``data.seq_len`` window) of the global batch;
- ``global``: each microbatch (its ``micro_batch_size`` sequences; which sequences form a
  microbatch does not depend on dp, tp, cp, ep or pp). An exact step-wide set would need every
  microbatch's routing before the first backward, which gradient accumulation and pipeline
  schedules do not allow; Megatron's global variant uses running DP counts, which depend on dp.
  (Loom's ``global`` is Megatron's per-microbatch ``aux_loss``; ``seq`` its ``seq_aux_loss``.)
The step's loss is ``coeff * mean over the step's units``. A unit may be spread over the ranks
of a TP (sequence-parallel) and CP group: only its counts c_e and |S| are summed over them
(``scope.sum_over_shards``); each rank adds the probability sum of its own tokens, so the local
terms sum to the unit's loss and backward needs no collective. The router z-loss is
``coeff * mean over the step's tokens of logsumexp(logits)^2``.

The losses join the objective through ``AttachLoss`` on the layer output: its backward gives
the loss the gradient 1 whenever the layer's output gets its gradient, so any pipeline
schedule collects them exactly once per microbatch with no help from the executor. Detached
values, the expert load and the dropped assignments accumulate in ``MoE.stats`` until the
trainer reads and resets them (``MoEStats``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.compat import grouped_mm, grouped_mm_runs
from loom.model.quant import expert_grouped_mm, expert_linear, is_nf4
from loom.model.layers import SwiGLU
from loom.model.recompute import recomputing
from loom.model.surface import COLUMN, ROW, Surface

# ----------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """``experts`` int64 ``[T, k]`` (-1: dropped by capacity); ``weights`` fp32 ``[T, k]`` combine
    weights; ``scores`` fp32 ``[T, k]`` router probability of each choice (capacity order);
    ``probs`` fp32 ``[T, E]`` what the balancing loss sees; ``may_drop``: capacity dropping ran, so
    the number of kept assignments is known on the device only (else it is ``T * k``)."""

    experts: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    may_drop: bool = False


def count_values(index: torch.Tensor, n: int) -> torch.Tensor:
    """int64 ``[n]``: occurrences of each of ``0 .. n-1`` in ``index`` (every value in range).

    ``torch.bincount`` would do, but on CUDA it reads the input's extremes back to the host first:
    a sync per call, several per MoE layer.
    """
    flat = index.reshape(-1).long()
    return torch.zeros(n, dtype=torch.int64, device=index.device).scatter_add_(0, flat, torch.ones_like(flat))


class Router(nn.Module):
    """Linear gate computed in fp32 (routing decisions should not depend on autocast)."""

    def __init__(self, hidden: int, num_experts: int, correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        bias = torch.zeros(num_experts) if correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts up, over-loaded ones down."""
        if self.e_score_correction_bias is not None and rate > 0:
            bias = self.e_score_correction_bias
            bias += rate * torch.sign(load.float().mean() - load.float()).to(bias)


def route(logits: torch.Tensor, cfg, bias: Optional[torch.Tensor] = None) -> Routing:
    """Top-k routing of fp32 ``logits [T, E]`` under ``cfg`` (a MoEConfig).

    softmax: weights are the softmax probabilities of the chosen experts (Mixtral, Qwen-MoE).
    sigmoid: weights are the sigmoid scores (DeepSeek-V3). Either way the correction ``bias``
    and the group limit affect which experts are chosen, never the weights; then optional
    renormalisation over the k choices (``renormalises``) and the routed scaling factor.
    """
    if cfg.router == "softmax":
        probs = torch.softmax(logits, dim=-1)
        balance = probs
    else:
        probs = torch.sigmoid(logits)
        balance = probs / (probs.sum(-1, keepdim=True) + 1e-20)
    select = probs.detach() if bias is None else probs.detach() + bias
    if cfg.n_group > 1:
        select = _limit_groups(select, cfg.n_group, cfg.topk_group)
    experts = torch.topk(select, cfg.top_k, dim=-1).indices
    if cfg.force_balanced_routing:
        experts = balanced_assignment(logits.shape[0], cfg.top_k, logits.shape[1], logits.device)
    scores = probs.gather(-1, experts)
    weights = scores
    if renormalises(cfg):
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return Routing(experts, weights * cfg.routed_scaling_factor, scores.detach(), balance)


def balanced_assignment(num_tokens: int, top_k: int, num_experts: int, device) -> torch.Tensor:
    """``[T, k]``: assignment j of token t goes to expert ``(t k + j) mod E``, so every expert gets
    ``T k / E`` of them (exactly when E divides T k) and each token k distinct experts (k <= E)."""
    slots = torch.arange(num_tokens * top_k, device=device).view(num_tokens, top_k)
    return slots % num_experts


def renormalises(cfg) -> bool:
    """Whether ``route`` rescales the chosen weights to sum to 1 under ``cfg`` (a MoEConfig).

    With k = 1 only under ``norm_top1_prob`` (HF's semantics): by default a single choice keeps
    its probability, as in Switch, so the LM loss still trains the router.
    """
    return cfg.norm_topk_prob and (cfg.top_k > 1 or cfg.norm_top1_prob)


def _limit_groups(select: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Keep the ``topk_group`` groups with the largest sum of their top-2 scores; mask the rest.

    Differs on purpose from Megatron's ``group_limited_topk``, which sums a group's top
    ``top_k // topk_group`` scores (the same only when that is 2) and, with softmax after the
    top-k, sums raw logits. DeepSeek-V3's reference always sums the top-2 selection scores, and
    models trained with it expect that grouping (tests/test_moe_megatron.py pins both cases).
    """
    t, e = select.shape
    grouped = select.view(t, n_group, e // n_group)
    group_score = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
    keep = group_score.topk(topk_group, dim=-1).indices
    mask = torch.zeros(t, n_group, dtype=torch.bool, device=select.device).scatter_(1, keep, True)
    return grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view(t, e)


def apply_capacity(routing: Routing, num_experts: int, capacity: int) -> torch.Tensor:
    """Drop assignments beyond ``capacity`` per expert, in place; return how many were dropped
    (a 0-dim tensor: the count stays on the device).

    Each expert keeps its highest-probability assignments; equal probabilities keep the lower
    token index. Dropped assignments get expert -1 and weight 0.
    """
    flat_e, flat_s = routing.experts.reshape(-1), routing.scores.reshape(-1)
    # Stable sorts: by probability (token order survives among ties), then by expert.
    by_score = torch.sort(-flat_s, stable=True).indices
    order = by_score[torch.sort(flat_e[by_score], stable=True).indices]
    counts = count_values(flat_e, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat_e.numel(), device=flat_e.device) - starts[flat_e[order]]
    drop = torch.zeros_like(flat_e, dtype=torch.bool)
    drop[order] = rank >= capacity
    drop = drop.view_as(routing.experts)
    routing.experts = routing.experts.masked_fill(drop, -1)
    routing.weights = routing.weights.masked_fill(drop, 0.0)
    routing.may_drop = True
    return drop.sum()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Assignments each expert accepts from the ``num_tokens`` this layer sees on this rank (as Megatron:
    under SP or CP that is a shard of the microbatch, so dropping then depends on the layout)."""
    return math.ceil(factor * num_tokens * top_k / num_experts)


# ----------------------------------------------------------------------------- permutation


@dataclass
class Permutation:
    """Assignments sorted by expert. ``token [N]`` source row of each permuted row, ``slot [N]``
    its flat ``[T*k]`` index (for the weight), ``counts [E]`` rows per expert (int64)."""

    token: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor
    num_tokens: int


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat ``[T*k]`` assignment indices sorted by expert, dropped ones last; rows per expert ``[E]``)."""
    key = experts.reshape(-1).masked_fill(experts.reshape(-1) < 0, num_experts)
    return torch.argsort(key, stable=True), count_values(key, num_experts + 1)[:num_experts]


def permute(x: torch.Tensor, experts: torch.Tensor, num_experts: int, sorted_slots=None,
            kept: Optional[int] = None) -> tuple[torch.Tensor, Permutation]:
    """``x [T, h]`` -> rows grouped by expert ``[N, h]`` (N = kept assignments); dropped ones go last and are cut.

    ``sorted_slots``: ``sort_by_expert``'s result, if already computed. ``kept``: N, if known on the
    host; None reads it from the device (a sync).
    """
    k = experts.shape[-1]
    slot, counts = sort_by_expert(experts, num_experts) if sorted_slots is None else sorted_slots
    slot = slot[: int(counts.sum()) if kept is None else kept]
    token = slot // k
    return x.index_select(0, token), Permutation(token, slot, counts, x.shape[0])


def unpermute(y: torch.Tensor, perm: Permutation, weights: torch.Tensor) -> torch.Tensor:
    """``[N, h]`` -> ``[T, h]``: each token sums its experts' outputs times the routing weights (fp32)."""
    w = weights.reshape(-1).index_select(0, perm.slot).unsqueeze(-1)
    out = torch.zeros(perm.num_tokens, y.shape[-1], dtype=torch.float32, device=y.device)
    return out.index_add(0, perm.token, y.float() * w)


class Dispatcher(Protocol):
    """Sends each token's rows to its experts (wherever they live) and combines what comes back."""

    def __call__(self, x: torch.Tensor, routing: Routing, experts: "GroupedExperts") -> torch.Tensor:
        """``x [T, h]`` routed by ``routing`` through ``experts`` (this rank's) -> ``[T, h]``."""


class LocalDispatcher:
    """All experts on this device: permute -> experts -> unpermute.

    Reads the rows per expert back to the host (one sync) only where something needs them there:
    capacity dropping (how many rows are kept) or experts that loop over the groups.
    """

    def __call__(self, x: torch.Tensor, routing: Routing, experts: "GroupedExperts") -> torch.Tensor:
        slots = sort_by_expert(routing.experts, experts.num_experts)
        host_counts = None
        if routing.may_drop or experts.needs_host_counts(x):
            host_counts = slots[1].tolist()
        kept = routing.experts.numel() if host_counts is None else sum(host_counts)
        xp, perm = permute(x, routing.experts, experts.num_experts, slots, kept)
        return unpermute(experts(xp, perm.counts, host_counts), perm, routing.weights).to(x.dtype)


# ----------------------------------------------------------------------------- experts


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (grouped GEMM's backward needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's where it is on, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts with stacked weights; this rank's slice under EP / ETP.

    forward: ``x [N, h]`` grouped by expert with ``counts [E_local]`` rows each -> ``[N, h]``;
    ``host_counts``: the same counts as a host list, if the caller has them (the loop needs them).
    Under expert tensor parallelism F is this rank's slice and the output a partial sum.

    A stacked weight's slot holds its Parameter, or under QLoRA its NF4 form; ``adapters`` holds LoRA's
    per-expert adapter of each weight that has one (each ``delta(x, a, b, mm)`` adds its share).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, grouped_gemm: bool = True):
        super().__init__()
        self.num_experts, self.grouped_gemm = num_experts, grouped_gemm
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.adapters = nn.ModuleDict()

    def surface(self) -> Surface:
        return Surface(stacked={"gate_proj": COLUMN, "up_proj": COLUMN, "down_proj": ROW}, stacked_adapters="adapters",
                       recompute=("activation",))

    def _stacked(self) -> dict:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}

    def reset_parameters(self, std: float) -> None:
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, mean=0.0, std=std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, host_counts: Optional[list] = None) -> torch.Tensor:
        dtype = compute_dtype(x)
        if self.use_grouped_mm(x.device, dtype):
            return self._grouped(x.to(dtype), counts, dtype)
        return self._loop(x, counts.tolist() if host_counts is None else host_counts)

    def needs_host_counts(self, x: torch.Tensor) -> bool:
        """Whether forward on ``x`` reads the counts on the host (the loop over experts does)."""
        return not self.use_grouped_mm(x.device, compute_dtype(x))

    def use_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        # grouped GEMM wants 16-byte aligned rows in every operand.
        sizes = self.weight_shape("gate_proj")[1:] + tuple(a.lora_A.shape[1] for a in self.adapters.values())
        aligned = all(n * dtype.itemsize % 16 == 0 for n in sizes)
        return self.grouped_gemm and aligned and grouped_mm_runs(device.type, dtype)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)

        def mm(a, w):  # w: [E, out, in]
            return _ContiguousGrad.apply(grouped_mm(a, w.to(dtype).transpose(-2, -1), offs))

        stacked, adapters = self._stacked(), self.adapters

        def proj(a, name):  # a LoRA adapter is two more grouped GEMMs through rank r
            w = stacked[name]  # QLoRA: the frozen stack in NF4
            out = _ContiguousGrad.apply(expert_grouped_mm(a, w, offs, dtype)) if is_nf4(w) else mm(a, w)
            if name in adapters:
                out = out + adapters[name].delta(a, adapters[name].lora_A, adapters[name].lora_B, mm)
            return out

        return proj(self.activation(proj(x, "gate_proj"), proj(x, "up_proj")), "down_proj")

    def weight_shape(self, name: str) -> tuple:
        return tuple(self._stacked()[name].shape)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """SwiGLU's ``silu(gate) * up``: its own method so selective recompute can drop its output."""
        return F.silu(gate) * up

    def _loop(self, x: torch.Tensor, counts: list) -> torch.Tensor:
        # unbind: one backward that stacks the per-expert gradients (indexing would zero-fill E times)
        stacked = self._stacked()
        weights = {n: w.unbind(0) for n, w in stacked.items() if not is_nf4(w)}
        adapters = {n: (a, a.lora_A.unbind(0), a.lora_B.unbind(0)) for n, a in self.adapters.items()}
        outs, start = [], 0

        def proj(rows, name, e):
            w = stacked[name]
            out = expert_linear(rows, w, e) if is_nf4(w) else F.linear(rows, weights[name][e])
            if name in adapters:
                adapter, lora_a, lora_b = adapters[name]
                out = out + adapter.delta(rows, lora_a[e], lora_b[e], F.linear)
            return out

        for e, n in enumerate(counts):
            rows = x[start:start + n]
            start += n
            if n:
                outs.append(proj(self.activation(proj(rows, "gate_proj", e), proj(rows, "up_proj", e)), "down_proj", e))
        if not outs:  # stay in the graph: every EP rank must run the backward collectives
            return (x * 0).to(compute_dtype(x))
        return torch.cat(outs)


# ----------------------------------------------------------------------------- balancing


class Scope(Protocol):
    """Which tokens share balancing statistics, and what one forward's share of a step is."""

    def units(self, num_tokens: int, meta, kind: str, device=None) -> tuple[torch.Tensor, int]: ...

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor: ...

    def units_per_step(self, kind: str, units_here: int) -> int: ...

    def tokens_per_step(self, num_tokens: int) -> int: ...


class BalanceScope:
    """Which tokens share balancing statistics and how a forward's share of the losses is normalised.

    This default (one device, no trainer) treats each forward as a whole step made of one unit.
    ``expert_parallel.ShardedBalanceScope`` knows the sequence length, the step size and the
    ranks that hold pieces of one microbatch.
    """

    def units(self, num_tokens: int, meta, kind: str, device=None) -> tuple[torch.Tensor, int]:
        """(unit id of each local token ``[T]`` int64 on ``device``, units in this microbatch)."""
        return torch.zeros(num_tokens, dtype=torch.long, device=device), 1

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def units_per_step(self, kind: str, units_here: int) -> int:
        return units_here

    def tokens_per_step(self, num_tokens: int) -> int:
        return num_tokens


@dataclass(frozen=True)
class MoEWiring:
    """How a model's MoE layers exchange tokens and share balancing statistics, handed to the build:
    one ``scope`` for the step, a dispatcher per layer (global index; a layer not listed keeps its
    experts on this device). The default is one device with no trainer."""

    scope: Scope = field(default_factory=BalanceScope)
    dispatchers: Mapping[int, Dispatcher] = field(default_factory=dict)

    def dispatcher(self, layer: int) -> Dispatcher:
        return self.dispatchers.get(layer) or LocalDispatcher()


class AttachLoss(torch.autograd.Function):
    """Make a scalar ``loss`` part of the objective through the activations ``x``.

    forward: returns ``x`` unchanged. backward: passes ``x``'s gradient through and gives
    ``loss`` the gradient 1, so it is backpropagated exactly when (and as often as) ``x`` is.
    """

    @staticmethod
    def forward(ctx, x, loss):
        ctx.save_for_backward(loss)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        (loss,) = ctx.saved_tensors
        return g, torch.ones_like(loss)


class MoEStats:
    """Detached per-step sums of one layer on this rank: expert load ``[E]``, dropped assignments,
    aux and z-loss (as added to the objective). The trainer sums them over ranks, then resets."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.load: Optional[torch.Tensor] = None
        self.dropped = 0  # a device tensor once capacity dropping ran: read at the end of the step only
        self.aux = 0.0
        self.z = 0.0

    def add(self, experts: torch.Tensor, dropped, aux, z) -> None:
        load = count_values(experts.masked_fill(experts < 0, self.num_experts), self.num_experts + 1)
        load = load[:self.num_experts].float()
        self.load = load if self.load is None else self.load + load
        self.dropped += dropped
        self.aux = self.aux + (aux.detach() if torch.is_tensor(aux) else aux)
        self.z = self.z + (z.detach() if torch.is_tensor(z) else z)

    def vector(self, device) -> torch.Tensor:
        """``[E + 3]`` fp32: load, dropped, aux, z."""
        load = self.load if self.load is not None else torch.zeros(self.num_experts)
        tail = [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(1)
                for v in (self.dropped, self.aux, self.z)]
        return torch.cat([load.float().to(device), *tail])


# ----------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """Routed experts plus an optional (gated) shared expert: ``[T, h] -> [T, h]``."""

    takes_meta = True  # DecoderBlock hands it the PackedMeta (the balancing units need it)

    def __init__(self, hidden: int, cfg, intermediate: int, shared_intermediate: int = 0,
                 dispatcher: Optional[Dispatcher] = None, scope: Optional[Scope] = None):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(hidden, cfg.num_experts, cfg.router == "sigmoid" or cfg.bias_update_rate > 0)
        self.experts = GroupedExperts(cfg.num_experts, hidden, intermediate, cfg.grouped_gemm)
        self.shared_expert = SwiGLU(hidden, shared_intermediate) if shared_intermediate else None
        gated = shared_intermediate and cfg.shared_expert_gate
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False) if gated else None
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()
        self.scope: Scope = scope or BalanceScope()
        self.stats = MoEStats(cfg.num_experts)

    def surface(self) -> Surface:
        return Surface(experts="experts", token_sliced=("gate", "shared_expert_gate"),
                       adapters={"shared_expert": "shared_expert", "experts": "experts"})

    # Under train.compile the layer runs eagerly inside its compiled block: routing makes every shape
    # data-dependent (rows per expert, dropped assignments, the EP exchange's split sizes), and the
    # statistics are Python-side records; traced, it would break the graph at each and recompile
    # for every routing.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, meta=None) -> torch.Tensor:
        logits = self.gate(x)
        routing = route(logits, self.cfg, self.gate.e_score_correction_bias)
        aux, z = self.balance_losses(logits, routing, meta)  # on the demand, before any drop
        dropped = 0
        if self.cfg.capacity_factor is not None:
            capacity = expert_capacity(x.shape[0], self.cfg.top_k, self.cfg.num_experts, self.cfg.capacity_factor)
            dropped = apply_capacity(routing, self.cfg.num_experts, capacity)
        out = self.dispatcher(x, routing, self.experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if not recomputing():  # a recompute in backward replays the forward: count it once
            self.stats.add(routing.experts, dropped, aux, z)
        loss = aux + z
        if torch.is_tensor(loss) and loss.requires_grad:
            out = AttachLoss.apply(out, loss)
        return out

    def balance_losses(self, logits: torch.Tensor, routing: Routing, meta):
        """(aux, z): this forward's share of the step's balancing losses, coefficients applied."""
        cfg, n = self.cfg, logits.shape[0]
        aux = z = 0.0
        if cfg.aux_loss_coeff > 0:
            aux = cfg.aux_loss_coeff * self._switch_loss(routing, meta, n)
        if cfg.z_loss_coeff > 0:
            lse = torch.logsumexp(logits, dim=-1)
            z = cfg.z_loss_coeff * lse.square().sum() / self.scope.tokens_per_step(n)
        return aux, z

    def _switch_loss(self, routing: Routing, meta, n: int) -> torch.Tensor:
        # c_e counts the real assignments, after the selection bias and the group limit, so the loss
        # balances the load the experts receive (as DeepSeek-V3's reference). Megatron counts a
        # separate top-k of the unbiased, ungrouped scores: the two agree only without either.
        e, k, kind = self.cfg.num_experts, self.cfg.top_k, self.cfg.aux_loss_type
        unit, num_units = self.scope.units(n, meta, kind, routing.probs.device)
        counts = torch.zeros(num_units, e, device=unit.device)
        counts.index_put_((unit.unsqueeze(-1).expand_as(routing.experts), routing.experts),
                          torch.ones((), device=unit.device), accumulate=True)
        sizes = count_values(unit, num_units).float()
        both = self.scope.sum_over_shards(torch.cat([counts.reshape(-1), sizes]))
        counts, sizes = both[:-num_units].view(num_units, e), both[-num_units:].clamp(min=1)
        prob_sums = torch.zeros(num_units, e, device=unit.device).index_add(0, unit, routing.probs)
        per_unit = (counts * prob_sums).sum(-1) * e / (k * sizes.square())
        return per_unit.sum() / self.scope.units_per_step(kind, num_units)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        self.gate.update_bias(load, self.cfg.bias_update_rate)
