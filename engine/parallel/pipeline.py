"""Pipeline parallelism: stage split with stable parameter names, p2p, and one table executor.

- ``split_stages`` cuts the single-device model into this rank's virtual stages. Each is a copy
  of the model skeleton that keeps only its blocks (keyed by global layer index) and sets the
  first / last stage's declared parts (embedding; final norm and LM head) to None where it does
  not own them, so parameter names are those of the whole model and checkpoints never see
  stage-local names.
- ``PipelineExecutor`` runs one rank's schedule table (pipeline_schedule.py): forward steps
  through a callback, backward steps with autograd (split into B and W passes where the table
  has W steps, split_backward.py), p2p steps posted asynchronously on one process group per
  link and direction (``p2p_links``). It knows nothing of the schedule that built the table.
- ``Pipeline`` is what the trainer holds: tables per microbatch count, the boundary shape and
  dtype, the loss made known on every rank, and the tied embedding / LM head gradient sum.
"""
from __future__ import annotations

import copy
import itertools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from loom.config import stage_layout
from loom.model import surface
from loom.parallel.mesh import ParallelGroups, group_layout
from loom.parallel.sharding import set_spec
from loom.parallel.pipeline_schedule import (
    B, DIRECTION, F, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Table, build_table, last_weight_steps, peer_of,
    splits_backward,
)
from loom.parallel.split_backward import SplitBackward

# ----------------------------------------------------------------------------- stages


def stage_layers(num_layers: int, pp: int, vpp: int = 1, layout: Optional[Sequence[int]] = None) -> list[range]:
    """Global layer indices of every virtual stage, in pipeline order (stage s = chunk * pp + rank)."""
    layout = stage_layout(num_layers, pp, vpp, layout)
    starts = [0, *itertools.accumulate(layout)]
    return [range(starts[s], starts[s + 1]) for s in range(len(layout))]


def split_stages(model: nn.Module, pp_rank: int, pp: int, vpp: int = 1,
                 layout: Optional[Sequence[int]] = None) -> list[nn.Module]:
    """This rank's chunks: virtual stages ``pp_rank, pp_rank + pp, ...`` (Megatron order).

    Parameters are moved, not copied: each chunk shares its tensors with ``model``, which the
    caller drops. Run this before tensor parallelism so every chunk is a plain module. Which parts
    a stage keeps is the model's declaration (engine/model/surface.py): its blocks by global index,
    the ``first`` parts on the first stage only, the ``last`` on the last (a VLM's vision tower and
    projector are first-stage parts).
    """
    stages = stage_layers(len(surface.blocks(surface.language_model(model))), pp, vpp, layout)
    chunks = []
    for chunk in range(vpp):
        stage = chunk * pp + pp_rank
        chunks.append(_stage_module(model, stages[stage], first=stage == 0, last=stage == pp * vpp - 1))
    return chunks


def _stage_module(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    keep = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    stage = copy.deepcopy(model, memo=keep)  # new modules around the same tensors
    _trim(stage, layers, first, last)
    return stage


def _trim(module: nn.Module, layers: range, first: bool, last: bool) -> None:
    s = surface.surface_of(module)
    if s.blocks is not None:
        held = surface.part(module, s.blocks)
        for name in list(held.keys()):
            if int(name) not in layers:
                del held[name]
    for name in (() if first else s.first) + (() if last else s.last):
        surface.set_part(module, name, None)
    if s.language is not None:
        _trim(surface.part(module, s.language), layers, first, last)


def join_chunks(chunks: list[nn.Module]) -> nn.Module:
    """One module holding every chunk's submodules (the same objects) under their global names.

    What the optimizer, gradient buffers and checkpoints see: this rank's whole share of the
    model, with the names it has at world size 1. Not for forward (chunks are not contiguous).
    """
    if len(chunks) == 1:
        return chunks[0]
    s = surface.surface_of(chunks[0])
    if s.language is not None:  # VLM shells: join their language parts
        joined = copy.copy(chunks[0])
        joined._modules = {**chunks[0]._modules,
                           s.language: join_chunks([surface.part(c, s.language) for c in chunks])}
        return joined
    reuse = {id(m): m for chunk in chunks for m in chunk.modules() if m is not chunk}
    joined = copy.deepcopy(chunks[0], memo=reuse)
    layers = sorted(((k, v) for chunk in chunks for k, v in surface.part(chunk, s.blocks).items()),
                    key=lambda kv: int(kv[0]))
    surface.set_part(joined, s.blocks, nn.ModuleDict(layers))
    for name in s.last:
        surface.set_part(joined, name, surface.part(chunks[-1], name))
    return joined


def tied_embedding(chunks: list[nn.Module], groups: ParallelGroups, tie: bool):
    """(this rank's tied weight, the first+last stage group) or (None, None).

    With tied embeddings the first stage holds ``embed.weight`` and the last ``lm_head.weight``,
    two copies of one weight. Their gradients are summed over the pair so both copies take the
    same step; the last stage's copy is marked ``tied_replica`` so the gradient norm and
    gathered gradients count the weight once. Collective: every rank builds every pair's group.
    """
    if not tie or groups.dims.pp == 1:
        return None, None
    mine = None
    for ranks in group_layout(groups.dims)["pp"]:  # sorted: ranks[0] is stage 0, ranks[-1] the last
        pair = [ranks[0], ranks[-1]]
        group = dist.new_group(pair, timeout=groups.timeout, group_desc="tied_embedding")
        if groups.rank in pair:
            mine = group
    first, last = surface.language_model(chunks[0]), surface.language_model(chunks[-1])
    weight = None
    for holder, source in surface.surface_of(first).ties:  # (lm_head, embed)
        if surface.part(first, source) is not None:
            weight = surface.part(first, source).weight
        elif surface.part(last, holder) is not None:
            weight = surface.part(last, holder).weight
            set_spec(weight, tied_replica=True)
    return weight, mine


# ----------------------------------------------------------------------------- executor


def p2p_links(pipelines: Sequence[Sequence[int]], rank: int, wrap: bool, timeout=None) -> dict:
    """This rank's point-to-point groups: ``{(direction, link): group}``.

    Link ``a`` joins pipeline ranks ``a`` and ``a + 1``; activations cross it forwards on one
    group and gradients backwards on another (``wrap``: also from the last rank to the first,
    for interleaved chunks). A communicator runs what is posted on it in order (NCCL: one
    stream), so with one group per direction and link each carries a single stream of messages
    in the order both sides post them, and a receive posted ahead delays nothing else
    (pipeline_simulate.py replays the tables under this model). Each op is posted alone, so the
    first one on a link involves both its members, as NCCL's lazily built communicators need.
    Collective: every rank of the world builds every pipeline's links, in the same order.
    """
    mine = {}
    for ranks in pipelines:
        pp = len(ranks)
        for a in range(pp if wrap else pp - 1):
            pair = sorted({ranks[a], ranks[(a + 1) % pp]})
            for direction in (F, B):
                desc = f"pp_{'activations' if direction == F else 'gradients'}_{a}"
                group = dist.new_group(pair, timeout=timeout, group_desc=desc)
                if rank in pair:
                    mine[(direction, a)] = group
    return mine


class StageOutput(NamedTuple):
    """What a stage's forward of one microbatch hands the executor.

    output: activations for the next stage ``[T_local, h]``; None on the last stage.
    objective: scalar to backpropagate from this stage (the normalised loss on the last stage,
        an auxiliary loss on any stage), or None.
    stats: detached scalars summed over microbatches, chunks and stages, e.g. ``loss_sum``.
    """

    output: Optional[torch.Tensor]
    objective: Optional[torch.Tensor]
    stats: dict


ForwardFn = Callable[[int, Optional[torch.Tensor], Any], StageOutput]


class _RunState:
    """Tensors alive during one run, keyed by (microbatch, chunk)."""

    def __init__(self, microbatches, forward_fn, boundary, stat_names, device, split):
        self.microbatches, self.forward_fn, self.boundary = microbatches, forward_fn, boundary
        self.split = split  # B computes input gradients only, W the weights' (the table has W steps)
        self.stat_names = list(stat_names)
        self.totals = torch.zeros(len(stat_names), dtype=torch.float32, device=device)
        self.inputs: dict = {}  # received activations, inputs of forward steps
        self.saved: dict = {}  # (input, StageOutput) kept from forward to backward
        self.out_grads: dict = {}  # received gradients of this rank's outputs
        self.weights: dict = {}  # SplitBackward kept from B to W
        self.outbox: dict = {}  # (kind, mb, chunk) -> tensor awaiting its send step
        self.receiving: dict = {}  # (kind, mb, chunk) -> (work, buffer) posted, not yet waited
        self.sending: list = []  # (work, tensor) posted, not known to be complete
        self.in_flight = 0
        self.peak_in_flight = 0


class PipelineExecutor:
    """Runs one rank's schedule table over the pp ``group``; the same code for every schedule.

    ``links``: this rank's ``p2p_links``. By default they are built here, which is collective
    over the world and right only when ``group`` is the whole world.
    """

    def __init__(self, group, device: torch.device, links: Optional[dict] = None):
        self.group, self.device = group, device
        self.peers = dist.get_process_group_ranks(group)
        self.pp, self.rank = len(self.peers), dist.get_rank(group)
        if links is None:
            if self.pp != dist.get_world_size():
                raise ValueError("PipelineExecutor: pass the links of every pipeline (p2p_links) when the pp "
                                 "group is not the whole world")
            links = p2p_links([self.peers], dist.get_rank(), wrap=True)
        self.links = links
        self.peak_in_flight = 0
        self.trace: Optional[list] = None  # a list: record (action, start, end, thread CPU seconds) per compute

    def run(self, table: Table, microbatches: Sequence, forward_fn: ForwardFn,
            boundary: Callable[[Any], tuple], grad_sync: Optional[Callable[[bool], None]] = None,
            stat_names: Sequence[str] = ("loss_sum",)) -> dict[str, torch.Tensor]:
        """Run ``table``; return the stats summed over microbatches and the whole pipeline.

        ``boundary(mb)`` gives ``(shape, dtype)`` of the activations crossing stages for ``mb``
        (known from the config and the microbatch, so no shape handshake); outputs travel in
        that dtype. ``grad_sync(last)`` is called before each step that accumulates weight
        gradients (B, or W where the table has W steps), with True on each chunk's last one
        (its gradients are then final and may be reduced over DP).
        """
        state = _RunState(microbatches, forward_fn, boundary, stat_names, self.device, splits_backward(table))
        last = set(last_weight_steps(table).values())
        for index, step in enumerate(table):
            a = step[0]
            if a.kind in (F, B):
                self._arrive(state, a)
            if grad_sync is not None and a.kind == (W if state.split else B):
                grad_sync(index in last)
            if a.kind == F:
                self._timed(a, self._forward, state, a)
            elif a.kind == B:
                self._timed(a, self._backward, state, a)
            elif a.kind == W:
                self._timed(a, self._weights, state, a)
            else:
                self._post(state, step)
        for work, _ in state.sending:
            work.wait()
        state.sending.clear()
        if state.saved or state.outbox or state.inputs or state.out_grads or state.weights or state.receiving:
            raise RuntimeError("pipeline table left tensors behind: it is not a complete schedule")
        self.peak_in_flight = state.peak_in_flight
        dist.all_reduce(state.totals, group=self.group)  # the last stage's loss, known on every rank
        return dict(zip(state.stat_names, state.totals))

    def _timed(self, action: Action, fn, *args) -> None:
        start, cpu = time.perf_counter(), time.thread_time()
        fn(*args)
        if self.trace is not None:
            self.trace.append((action, start, time.perf_counter(), time.thread_time() - cpu))

    def _arrive(self, state: _RunState, a: Action) -> None:
        """Wait for the receive that ``a`` consumes, if it has one."""
        kind = RECV_F if a.kind == F else RECV_B
        posted = state.receiving.pop((kind, a.mb, a.chunk), None)
        if posted is None:
            return
        work, buffer = posted
        work.wait()
        if kind == RECV_F:
            state.inputs[(a.mb, a.chunk)] = buffer.requires_grad_()
        else:
            state.out_grads[(a.mb, a.chunk)] = buffer

    def _forward(self, state: _RunState, a: Action) -> None:
        x = state.inputs.pop((a.mb, a.chunk), None)  # None: the first stage reads the microbatch
        out = state.forward_fn(a.chunk, x, state.microbatches[a.mb])
        for name, value in out.stats.items():
            if name not in state.stat_names:
                raise KeyError(f"stage stat {name!r} is not among the pipeline's stat_names {state.stat_names}")
            state.totals[state.stat_names.index(name)] += value.detach().float()
        if out.output is not None:
            state.outbox[(SEND_F, a.mb, a.chunk)] = self._boundary(out.output.detach(), state, a)
        state.saved[(a.mb, a.chunk)] = (x, out)
        state.in_flight += 1
        state.peak_in_flight = max(state.peak_in_flight, state.in_flight)

    def _backward(self, state: _RunState, a: Action) -> None:
        x, out = state.saved.pop((a.mb, a.chunk))
        roots, grads = [], []
        if out.output is not None:
            roots.append(out.output)
            grads.append(state.out_grads.pop((a.mb, a.chunk)).to(out.output.dtype))
        if out.objective is not None and out.objective.requires_grad:
            roots.append(out.objective)
            grads.append(None)  # a scalar: d objective / d objective = 1
        if state.split:
            pending = SplitBackward(roots, grads, x)
            state.weights[(a.mb, a.chunk)] = pending
            grad = pending.input_grad
        else:
            if roots:
                torch.autograd.backward(roots, grads)
            grad = None if x is None else x.grad if x.grad is not None else torch.zeros_like(x)
            state.in_flight -= 1
        if x is not None:
            state.outbox[(SEND_B, a.mb, a.chunk)] = grad.contiguous()

    def _weights(self, state: _RunState, a: Action) -> None:
        state.weights.pop((a.mb, a.chunk)).weights()
        state.in_flight -= 1

    def _boundary(self, tensor: torch.Tensor, state: _RunState, a: Action) -> torch.Tensor:
        shape, dtype = state.boundary(state.microbatches[a.mb])
        if tuple(tensor.shape) != tuple(shape) or not tensor.is_floating_point():
            raise RuntimeError(f"stage output of microbatch {a.mb} chunk {a.chunk} is {tuple(tensor.shape)} "
                               f"{tensor.dtype}, but the next stage receives {tuple(shape)} {dtype}")
        return tensor.to(dtype).contiguous()

    def _post(self, state: _RunState, step: tuple) -> None:
        """Post every op of a p2p step on its own link; nothing here waits."""
        state.sending = [(work, t) for work, t in state.sending if not work.is_completed()]
        for a in step:
            peer = self.peers[peer_of(a, self.rank, self.pp)]
            link = self.rank if a.kind in (SEND_F, RECV_B) else (self.rank - 1) % self.pp
            group = self.links[(DIRECTION[a.kind], link)]
            if a.kind in (SEND_F, SEND_B):
                tensor = state.outbox.pop((a.kind, a.mb, a.chunk))
                state.sending.append((self._p2p(dist.isend, tensor, peer, group), tensor))
            else:
                shape, dtype = state.boundary(state.microbatches[a.mb])
                buffer = torch.empty(shape, dtype=dtype, device=self.device)
                state.receiving[(a.kind, a.mb, a.chunk)] = (self._p2p(dist.irecv, buffer, peer, group), buffer)

    @staticmethod
    def _p2p(op, tensor: torch.Tensor, peer: int, group):
        # batch_isend_irecv, even for one op: it returns a handle under every backend and the
        # pre-flight dry run (NCCL coalesces it on the link's own communicator).
        return dist.batch_isend_irecv([dist.P2POp(op, tensor, peer, group)])[0]


# ----------------------------------------------------------------------------- the trainer's handle


class Pipeline:
    """This rank's part of the pipeline: schedule tables, executor, tied-embedding sync."""

    def __init__(self, chunks: list[nn.Module], groups: ParallelGroups, cfg):
        p = cfg.parallel
        self.schedule, self.pp, self.vpp, self.pp_rank = p.pp_schedule, p.pp, p.vpp, groups.pp_rank
        self.hidden = cfg.model.hidden_size
        # Under SP the residual stream between blocks is this TP rank's slice of the tokens.
        self.token_divisor = p.tp if p.sp else 1
        # Activations and their gradients cross stages in the compute dtype.
        self.dtype = cfg.train.precision.activations
        wrap = p.vpp > 1
        links = groups.memo(("p2p_links", wrap), lambda: p2p_links(group_layout(groups.dims)["pp"], groups.rank,
                                                                   wrap=wrap, timeout=groups.timeout))
        self.executor = PipelineExecutor(groups.pp, groups.device, links)
        self.tied_weight, self.tied_group = tied_embedding(chunks, groups, cfg.model.tie_embeddings)
        self._tables: dict[int, Table] = {}

    def table(self, num_microbatches: int) -> Table:
        if num_microbatches not in self._tables:
            self._tables[num_microbatches] = build_table(self.schedule, self.pp, self.vpp, num_microbatches,
                                                         self.pp_rank)
        return self._tables[num_microbatches]

    def boundary(self, shard) -> tuple[tuple[int, int], torch.dtype]:
        """Activations between stages: ``[T_local, h]``. ``shard`` is ``(PackedBatch, labels)``
        (Trainer.model_inputs), so T_local is the (CP-local) token count, divided by tp under SP."""
        batch, _ = shard
        return (batch.input_ids.shape[0] // self.token_divisor, self.hidden), self.dtype

    def run(self, shards: Sequence, forward_fn: ForwardFn, grad_sync=None,
            stat_names: Sequence[str] = ("loss_sum",)) -> dict[str, torch.Tensor]:
        """Forward and backward of every microbatch ``(PackedBatch, labels)``; see PipelineExecutor.run."""
        return self.executor.run(self.table(len(shards)), shards, forward_fn, self.boundary,
                                 grad_sync, stat_names)
