"""Expert parallelism: the all-to-all token dispatcher, expert sharding, and the MoE step statistics.

The model's ``MoE`` layer (engine/model/moe.py) stays single-device code; ``parallelize_moe``
gives each one this rank's slice of the experts, an ``ExpertParallelDispatcher`` over the
``ep x etp`` group, and a ``ShardedBalanceScope`` that knows which ranks share a microbatch.

Expert weights ``[E, F, h]`` / ``[E, h, F]`` are split over ep along E and over etp along F.
Which experts an ep rank holds is the layer's placement: ``contiguous`` (rank r holds experts
``[r E/ep, (r + 1) E/ep)``) or ``balanced``, a plan computed from recorded load
(tools/place_experts.py) that evens out the tokens each rank receives. The dispatcher sends an
assignment to the rank holding its expert; the weights' spec records their global rows, so
checkpoints stay in logical expert order under any placement. Their spec says ``expert``: their
gradients are reduced over the expert-data-parallel group only, and the gradient norm sums them
over the expert-model-parallel group (see mesh.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from loom.config import ConfigError
from loom.model.moe import (BalanceScope, GroupedExperts, MoE, MoEWiring, Routing, compute_dtype, permute,
                            sort_by_expert, unpermute)
from loom.model import surface
from loom.model.surface import COLUMN, REPLICATED, ROW
from loom.parallel import comm
from loom.parallel.index import ranges
from loom.parallel.context_parallel import CPShard
from loom.parallel.sharding import add_split, set_spec
from loom.parallel.tensor_parallel import mark

# ----------------------------------------------------------------------------- dispatcher


class _Plan(NamedTuple):
    """One dispatch: rows sent to / received from each rank, the etp copies (None: etp = 1), the
    (source, expert) -> (expert, source) order of the received rows and its inverse, rows per local
    expert (on the device and on the host), and the kept assignments of this rank."""

    send_splits: list
    recv_splits: list
    copies: Optional[torch.Tensor]
    order: torch.Tensor
    inverse: torch.Tensor
    local_counts: torch.Tensor
    host_local_counts: list
    kept: int


class _SharedByCopies:
    """Held by the layers of a built model, for the layout: a copy of the model (a pipeline stage split
    off it) shares it, as it shares the process groups inside it."""

    def __deepcopy__(self, memo):
        return self


class ExpertParallelDispatcher(_SharedByCopies):
    """Tokens to the ranks that hold their experts and back, over the ``ep x etp`` ``group``.

    Dispatch rank ``d = ep_rank * etp + etp_rank`` (etp fastest, as in the expert mesh) holds
    experts ``[ep_rank * E_l, (ep_rank + 1) * E_l)``, ``E_l = E / ep``, each split over the etp
    ranks along F. Per rank, with ``T`` local tokens, ``N`` kept assignments and ``R`` rows received:
      1. permute ``x [T, h] -> [N, h]``, grouped by global expert;
      2. exchange the rows per (destination, local expert): ``counts [n, E_l]``;
      3. all-to-all the rows, each ep slot's rows to every etp rank of it: ``[R, h]`` in
         (source, expert) order, regrouped to (expert, source) for the grouped GEMM;
      4. local experts ``[R, h] -> [R, h]`` (partial sums over F under etp > 1);
      5. the mirror: regroup back, all-to-all back ``[N * etp, h]``, sum the etp partials ``[N, h]``;
      6. unpermute weighted by the routing weights: ``[T, h]``.
    Backward runs the same exchanges in reverse (``comm.AllToAll``); copies sent to several etp
    ranks get their gradients summed by the duplication's backward.
    The host waits for the device once per call: for the exchanged row counts, from which every
    split size, the kept rows and the regrouping sizes follow (as Megatron's dispatcher).
    """

    def __init__(self, group, num_experts: int, ep: int, etp: int, placement: Optional[list[list[int]]] = None):
        if num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={num_experts}")
        if comm.group_size(group) != ep * etp:
            raise ValueError(f"the dispatch group has {comm.group_size(group)} ranks, not ep*etp = {ep}*{etp}")
        self.group, self.num_experts, self.ep, self.etp = group, num_experts, ep, etp
        self.local_experts = num_experts // ep
        # logical expert -> its slot in ep-rank order (None: the identity of the contiguous placement)
        slots = [e for rank in placement or () for e in rank]
        self.slot_of = None if not slots or slots == list(range(num_experts)) else \
            torch.argsort(torch.tensor(slots))
        self._slot_of_on: dict = {}  # per device: a copy from host memory each call could stall the host

    def __call__(self, x: torch.Tensor, routing: Routing, experts: GroupedExperts) -> torch.Tensor:
        chosen = routing.experts
        if self.slot_of is not None:
            if chosen.device not in self._slot_of_on:
                self._slot_of_on[chosen.device] = self.slot_of.to(chosen.device)
            slot = self._slot_of_on[chosen.device][chosen.clamp(min=0)]
            chosen = torch.where(chosen >= 0, slot, chosen)  # dropped assignments stay -1
        slots = sort_by_expert(chosen, self.num_experts)
        plan = self._plan(slots[1])
        xp, perm = permute(x, chosen, self.num_experts, slots, plan.kept)
        xp = xp.to(compute_dtype(x))  # under autocast the experts run in bf16: send bf16
        if plan.copies is not None:
            xp = xp.index_select(0, plan.copies)
        received = comm.all_to_all(xp, self.group, plan.recv_splits, plan.send_splits)
        out = experts(received.index_select(0, plan.order), plan.local_counts, plan.host_local_counts)
        back = comm.all_to_all(out.index_select(0, plan.inverse), self.group, plan.send_splits, plan.recv_splits)
        if plan.copies is not None:  # sum the etp ranks' partial outputs
            back = back.new_zeros((perm.token.numel(), back.shape[-1])).index_add(0, plan.copies, back)
        return unpermute(back, perm, routing.weights).to(x.dtype)

    def _plan(self, counts: torch.Tensor) -> _Plan:
        """Exchange the per-expert row counts ``[E]`` and derive the splits and reorderings."""
        per_slot = counts.view(self.ep, self.local_experts)
        send = per_slot.repeat_interleave(self.etp, dim=0)  # row d: what dispatch rank d gets
        recv = comm.all_to_all(send, self.group)  # row s: what source s sends, per local expert
        host = torch.cat([send.reshape(-1), recv.reshape(-1)]).tolist()  # the one sync
        n = self.ep * self.etp
        host_send = [host[d * self.local_experts:(d + 1) * self.local_experts] for d in range(n)]
        host_recv = [host[(n + s) * self.local_experts:(n + s + 1) * self.local_experts] for s in range(n)]
        send_splits, recv_splits = [sum(r) for r in host_send], [sum(r) for r in host_recv]
        copies = None
        if self.etp > 1:  # every etp rank of an ep slot gets that slot's rows
            rows = per_slot.sum(1)
            starts = torch.cumsum(rows, 0) - rows
            copies = ranges(starts.repeat_interleave(self.etp), rows.repeat_interleave(self.etp), sum(send_splits))
        order = self._expert_major(recv, sum(recv_splits))
        return _Plan(send_splits, recv_splits, copies, order, torch.argsort(order), recv.sum(0),
                     [sum(col) for col in zip(*host_recv)], sum(send_splits) // self.etp)

    @staticmethod
    def _expert_major(counts: torch.Tensor, total: int) -> torch.Tensor:
        """Rows laid out in (source, expert) blocks of ``counts [n, E_l]`` (``total`` rows) -> the
        (expert, source) order."""
        flat = counts.reshape(-1)
        starts = (torch.cumsum(flat, 0) - flat).view_as(counts)
        return ranges(starts.T.reshape(-1), counts.T.reshape(-1), total)


# ----------------------------------------------------------------------------- balancing scope


class ShardedBalanceScope(_SharedByCopies, BalanceScope):
    """Balancing units of a trainer microbatch whose tokens are split over ``shard_group``
    (the tp x cp ranks: SP slices ``sp_group``'s share contiguously, CP takes a zigzag shard).

    A token's unit is found from its index in the whole microbatch: under CP from the
    microbatch's ``CPShard`` (``meta.attn``), then this TP rank's contiguous slice.
    """

    def __init__(self, seq_len: int, sequences_per_step: int, micro_batch_size: int, sp_group, shard_group):
        self.seq_len, self.sequences_per_step, self.micro_batch_size = seq_len, sequences_per_step, micro_batch_size
        self.sp_group, self.shard_group = sp_group, shard_group

    def token_index(self, num_tokens: int, meta) -> torch.Tensor:
        sp = comm.group_size(self.sp_group)
        shard = getattr(meta, "attn", None)
        if isinstance(shard, CPShard):
            index = shard.plan.index(shard.rank)
        else:
            index = torch.arange(num_tokens * sp, device=meta.cu_seqlens.device if meta is not None else None)
        return comm.split(index, self.sp_group, 0) if sp > 1 else index

    def units(self, num_tokens: int, meta, kind: str, device=None) -> tuple[torch.Tensor, int]:
        if kind != "seq":
            return super().units(num_tokens, meta, kind, device)
        total = num_tokens * comm.group_size(self.shard_group)
        return (self.token_index(num_tokens, meta) // self.seq_len).to(device), -(-total // self.seq_len)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        return comm.all_reduce(t, self.shard_group)

    def units_per_step(self, kind: str, units_here: int) -> int:
        if kind == "seq":
            return self.sequences_per_step
        return self.sequences_per_step // self.micro_batch_size

    def tokens_per_step(self, num_tokens: int) -> int:
        return self.sequences_per_step * self.seq_len


# ----------------------------------------------------------------------------- parallelize


def moe_wiring(groups, cfg) -> MoEWiring:
    """What the model's MoE layers are built with under this layout: the trainer's balancing scope (the
    step's size, the ranks that share a microbatch) and, under ep x etp, the all-to-all dispatchers."""
    m = cfg.model
    scope = ShardedBalanceScope(cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                groups.tp, groups.tp_cp)
    ep, etp = comm.group_size(groups.ep), comm.group_size(groups.etp)
    if ep * etp == 1:
        return MoEWiring(scope)
    placement = expert_placement(cfg)
    return MoEWiring(scope, {i: ExpertParallelDispatcher(groups.ep_etp, m.moe.num_experts, ep, etp, placement[i])
                             for i in placement})


def parallelize_moe(model: nn.Module, groups, cfg) -> None:
    """Shard the experts over ep x etp (the model was built with ``moe_wiring(groups, cfg)``).

    The shared expert is tensor-parallel like a dense MLP (parallelize.py does that); the router
    and the shared-expert gate see this TP rank's token slice, so their gradients are partial.
    """
    layers = surface.routed_layers(model)
    if not layers:
        return
    ep, etp = comm.group_size(groups.ep), comm.group_size(groups.etp)
    tp_split = comm.group_size(groups.tp) > 1
    placement = expert_placement(cfg)
    for i, moe in layers.items():
        _check_wiring(moe, i, ep * etp > 1)
        s = surface.surface_of(moe)
        shard_experts(surface.part(moe, s.experts), groups, placement[i][groups.ep_rank])
        for _, sliced in surface.parts(moe, s.token_sliced if tp_split else ()):
            mark(sliced.weight, partial=True)


def _check_wiring(moe: MoE, layer: int, expert_parallel: bool) -> None:
    built_for = (isinstance(moe.scope, ShardedBalanceScope), isinstance(moe.dispatcher, ExpertParallelDispatcher))
    if built_for != (True, expert_parallel):
        raise ValueError(f"MoE layer {layer} was built for another layout (scope {type(moe.scope).__name__}, "
                         f"dispatcher {type(moe.dispatcher).__name__}): build the model with "
                         "wiring=moe_wiring(groups, cfg) before parallelize")


def shard_experts(experts: GroupedExperts, groups, mine: Optional[list[int]] = None) -> None:
    """Keep this rank's experts ``mine`` (over ep, dim 0; default the contiguous range) and its slice of F
    (over etp); mark them as expert params."""
    contiguous = contiguous_placement(experts.num_experts, comm.group_size(groups.ep))[groups.ep_rank]
    mine = contiguous if mine is None else list(mine)
    # Every stacked weight below ``experts`` (its own and its LoRA adapters' factors) follows its expert over
    # ep; over etp its F dim is split, and a factor without one stays whole, its gradient partial (as the
    # replicated factor of a column / row-parallel layer's adapter: tensor_parallel.py).
    for module, s in surface.declared(experts):
        for name, role in s.stacked.items():
            _shard_stacked(module, name, F_DIM[role], groups, mine, contiguous)
    experts.num_experts = len(mine)


F_DIM = {COLUMN: 1, ROW: 2, REPLICATED: None}  # the dim of a stacked [E, out, in] weight that holds F


def _shard_stacked(module: nn.Module, name: str, f_dim: Optional[int], groups, mine: list[int],
                   contiguous: list[int]) -> None:
    ep, etp = comm.group_size(groups.ep), comm.group_size(groups.etp)
    full = surface.part(module, name).detach()
    shard = full[torch.tensor(mine, device=full.device)]
    if f_dim is not None:
        shard = shard.chunk(etp, dim=f_dim)[groups.etp_rank]
    param = set_spec(mark(nn.Parameter(shard.clone()), partial=f_dim is None and etp > 1), expert=True,
                     rows=None if mine == contiguous else tuple(mine))
    for dim, group, size in ((0, groups.ep, ep), (f_dim, groups.etp, etp)):
        if size > 1 and dim is not None:
            add_split(param, dim, group)
    surface.set_part(module, name, param)


# ----------------------------------------------------------------------------- placement


def contiguous_placement(num_experts: int, ep: int) -> list[list[int]]:
    local = num_experts // ep
    return [list(range(r * local, (r + 1) * local)) for r in range(ep)]


def expert_placement(cfg) -> dict[int, list[list[int]]]:
    """The experts of each ep rank, per MoE layer (global index): ``parallel.expert_placement``'s."""
    m, p = cfg.model, cfg.parallel
    layers = [i for i in range(m.num_layers) if m.is_moe_layer(i)]
    plan = {i: contiguous_placement(m.moe.num_experts, p.ep) for i in layers}
    if p.expert_placement == "balanced":
        plan.update(read_placement_plan(placement_plan_path(cfg), m.moe.num_experts, p.ep, layers))
    return plan


def placement_plan_path(cfg) -> Path:
    return Path(cfg.parallel.expert_placement_plan or Path(cfg.train.run_dir) / "expert_placement.json")


def read_placement_plan(path: Path, num_experts: int, ep: int, layers: list[int]) -> dict[int, list[list[int]]]:
    """A plan file's placements (JSON: ``{"num_experts", "ep", "layers": {layer: [[experts of rank r]]}}``);
    layers it leaves out stay contiguous. Every error names the file."""
    where = f"expert placement plan {path} (parallel.expert_placement_plan)"
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where} not found: write one with `python tools/place_experts.py RUN`") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where} is not readable JSON: {e}") from None
    if not isinstance(plan, dict) or plan.get("num_experts") != num_experts or plan.get("ep") != ep:
        raise ConfigError(f"{where} is for num_experts={plan.get('num_experts') if isinstance(plan, dict) else None}, "
                          f"ep={plan.get('ep') if isinstance(plan, dict) else None}; this run has "
                          f"model.moe.num_experts={num_experts}, parallel.ep={ep}")
    out = {}
    for key, ranks in dict(plan.get("layers") or {}).items():
        if not str(key).isdigit() or int(key) not in layers:
            raise ConfigError(f"{where}: layer {key!r} is not one of the MoE layers {layers}")
        flat = [e for rank in ranks for e in rank] if isinstance(ranks, list) else None
        if flat is None or len(ranks) != ep or any(len(r) != num_experts // ep for r in ranks) \
                or sorted(flat) != list(range(num_experts)):
            raise ConfigError(f"{where}: layer {key} must list {ep} ranks of {num_experts // ep} experts each, "
                              f"every expert 0..{num_experts - 1} once; got {ranks!r}")
        out[int(key)] = [[int(e) for e in rank] for rank in ranks]
    return out


# ----------------------------------------------------------------------------- step statistics


def finish_moe_step(model: nn.Module, model_cfg, device: torch.device, group=None,
                    update_bias: bool = True) -> dict:
    """Sum the step's MoE statistics over ``group``, update the correction biases (unless the step was
    skipped: ``update_bias`` false), reset the stats.

    ``group`` must cover every rank that holds tokens or layers of the step; None is the whole
    world (the statistics are per rank and disjoint: SP/CP/DP ranks hold different tokens, pipeline
    stages different layers, EP ranks are DP/CP ranks). Every replica then applies the same bias
    update. Returns the metrics record fields: ``aux_loss`` and ``z_loss`` (as added to the
    objective, summed over layers), ``dropped_tokens`` (token-expert assignments dropped by
    capacity, all layers; ``dropped_by_layer`` per layer) and ``expert_load``
    ``{layer: [assignments per expert]}``, which per layer sums to tokens * top_k - dropped.
    """
    indices = [i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i)]
    if not indices:
        return {}
    e = model_cfg.moe.num_experts
    local = surface.routed_layers(model)
    table = torch.zeros(len(indices), e + 3, dtype=torch.float64, device=device)
    for row, i in enumerate(indices):
        if i in local:
            table[row] = local[i].stats.vector(device).double()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(table, group=group)
    for row, i in enumerate(indices):
        if i in local:
            if update_bias:
                local[i].update_bias(table[row, :e])
            local[i].stats.reset()
    table = table.cpu()
    return {"aux_loss": float(table[:, e + 1].sum()), "z_loss": float(table[:, e + 2].sum()),
            "dropped_tokens": int(table[:, e].sum()),
            "dropped_by_layer": {str(i): int(table[row, e]) for row, i in enumerate(indices)},
            "expert_load": {str(i): [int(c) for c in table[row, :e].tolist()] for row, i in enumerate(indices)}}
