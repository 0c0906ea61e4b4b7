"""Bytes moved by collectives: counted at the ``torch.distributed`` call boundary, and in theory.

``CollectiveCounter`` intercepts torch.distributed's collective and point-to-point functions
(engine/parallel/intercept.py) for as long as it is active, so every call counts, whoever makes
it: a stray or duplicated collective shows up beside the theory instead of hiding behind Loom's
own send sites. A call nested in another counted one (``all_gather_single`` calling
``all_gather_into_tensor``) counts once.

Bytes per rank and call, one convention for the count and the theory:

    all-reduce      the tensor
    all-gather      the gathered output (``broadcast``: the tensor; gloo's all-gather of a
                    flat buffer is one broadcast per slice, which add up to the output)
    reduce-scatter  the input (``reduce``: the tensor, likewise per slice on gloo)
    all-to-all      the rows sent to other ranks (a rank's rows to itself never leave it)
    p2p             the tensors sent (receives are the sender's bytes already)

``expected_traffic`` predicts the same figures, per parallel dimension, from the config and the
layout alone, with token routing uniform over the experts (what ``--routing balanced`` forces) and
no capacity drops. The planner (tools/plan.py) turns them into time.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from loom.parallel.intercept import Interceptor

KIND = {"all_reduce": "all-reduce", "all_gather_into_tensor": "all-gather", "all_gather_single": "all-gather",
        "all_gather": "all-gather", "broadcast": "all-gather", "reduce_scatter_tensor": "reduce-scatter",
        "reduce_scatter_single": "reduce-scatter", "reduce_scatter": "reduce-scatter", "reduce": "reduce-scatter",
        "all_to_all_single": "all-to-all", "all_to_all": "all-to-all", "send": "p2p", "isend": "p2p"}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "p2p")


def _nbytes(t) -> int:
    return sum(_nbytes(x) for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()


def _bytes_of(name: str, args: tuple, kwargs: dict, group) -> int:
    def arg(i, key):
        return kwargs[key] if key in kwargs else args[i] if len(args) > i else None

    if name in ("all_gather_into_tensor", "all_gather_single", "all_gather"):
        return _nbytes(arg(0, "output_tensor") if name != "all_gather" else arg(0, "tensor_list"))
    if name in ("reduce_scatter_tensor", "reduce_scatter_single"):
        return _nbytes(arg(1, "input"))
    if name == "reduce_scatter":
        return _nbytes(arg(1, "input_list"))
    if name == "all_to_all_single":
        inp, splits = arg(1, "input"), arg(3, "input_split_sizes")
        n, me = dist.get_world_size(group), dist.get_rank(group)
        rows = inp.shape[0] if inp.dim() else 1
        row = inp.numel() // max(rows, 1) * inp.element_size()
        splits = list(splits) if splits else [rows // n] * n
        return (sum(splits) - splits[me]) * row
    if name == "all_to_all":
        inputs, me = arg(1, "input_tensor_list"), dist.get_rank(group)
        return sum(_nbytes(t) for i, t in enumerate(inputs) if i != me)
    return _nbytes(arg(0, "tensor"))


class CollectiveCounter(Interceptor):
    """Bytes and calls per (kind, group ranks) on this rank while active (a context manager)."""

    names = tuple(KIND)

    def __init__(self):
        super().__init__()
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self.enabled = True

    def call(self, name: str, fn, args: tuple, kwargs: dict):
        if self.enabled:
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            if dist.get_world_size(group) > 1:
                key = (KIND[name], tuple(dist.get_process_group_ranks(group or c10d._get_default_group())))
                self.bytes[key] += _bytes_of(name, args, kwargs, group)
                self.calls[key] += 1
        return fn(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self):
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def by_kind(self) -> dict:
        out = dict.fromkeys(KINDS, 0)
        for (kind, _), n in self.bytes.items():
            out[kind] += n
        return out


# ----------------------------------------------------------------------------- theory


def _dtype_bytes(name: str) -> int:
    return 2 if name == "bf16" else 4


def rank_layers(cfg, pp_rank: int) -> tuple[list[int], list[tuple[bool, bool]]]:
    """The global layers on ``pp_rank`` and, per chunk, (first virtual stage, last virtual stage)."""
    from loom.config import stage_layout

    p, n = cfg.parallel, cfg.model.num_layers
    if p.pp == 1:
        return list(range(n)), [(True, True)]
    vpp = max(1, p.vpp)
    sizes = stage_layout(n, p.pp, vpp, p.pp_layout)
    starts = [sum(sizes[:v]) for v in range(len(sizes))]
    stages = [c * p.pp + pp_rank for c in range(vpp)]
    layers = [i for v in stages for i in range(starts[v], starts[v] + sizes[v])]
    return layers, [(v == 0, v == len(sizes) - 1) for v in stages]


class _Ledger(dict):
    """Bytes per (kind, dim), and in ``calls`` the torch.distributed calls that move them."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def add(self, kind: str, dim: str, nbytes: float, calls: float = 1) -> None:
        if nbytes:
            self[(kind, dim)] = self.get((kind, dim), 0) + nbytes
            self.calls[(kind, dim)] = self.calls.get((kind, dim), 0) + calls


def expected_traffic(cfg, world: int, numel: dict, pp_rank: int = 0,
                     loss_tokens: int | None = None) -> dict[tuple[str, str], float]:
    """Bytes per (kind, parallel dimension); see ``expected_ledger``."""
    return dict(expected_ledger(cfg, world, numel, pp_rank, loss_tokens))


def expected_ledger(cfg, world: int, numel: dict, pp_rank: int = 0, loss_tokens: int | None = None,
                    per_slice: bool = False) -> _Ledger:
    """Bytes per (kind, parallel dimension) that a rank of pipeline stage ``pp_rank`` moves in one step.

    From the config and the layout alone: ``numel`` holds the rank's trainable elements by role,
    ``dense`` (reduced over dp x cp) and ``expert`` (over the expert-data-parallel group), as its
    shard shapes give them (engine/train/memory.py's report). Exact for the data, tensor (with or
    without SP), expert and pipeline dimensions under uniform routing without capacity drops;
    context parallelism follows ring_attention.py's and ulysses.py's stated volumes. Recompute
    replays the forward's exchanges once more (``full``). ``.calls`` counts the calls (the planner's
    latency), with gloo's one call per slice of a flat bucket where ``per_slice``.

    Two terms are the mean over the ranks of a stage, not each rank's own: the vocabulary-split
    loss exchanges statistics for the rows that have a label (``loss_tokens`` of the step; default
    every token), which the data decides, and with the distributed optimizer each rank all-reduces
    over tp only the TP-partial gradients inside its shard of the buckets.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    tp, cp, pp, ep, etp = p.tp, p.cp, p.pp, p.ep, p.resolved_etp
    dp = cfg.dp_size(world)
    edp = world // (pp * ep * etp)
    a, h = _dtype_bytes(t.dtype), m.hidden_size
    micro = t.global_batch_size // (dp * t.micro_batch_size)
    seq = t.micro_batch_size * cfg.data.seq_len // cp  # a microbatch's tokens on this CP rank
    local = seq // tp if p.sp else seq  # ... in the residual stream (SP slices it)
    layers, chunks = rank_layers(cfg, pp_rank)
    moe = [i for i in layers if m.is_moe_layer(i)]
    fwd = 2 if t.recompute == "full" else 1
    out = _Ledger()
    per_micro = _Ledger()
    _tensor_parallel(per_micro, cfg, layers, chunks, seq, a, fwd)
    _context_parallel(per_micro, cfg, len(layers), seq, a, fwd)
    _experts(per_micro, cfg, len(moe), local, a, fwd)
    for first, last in chunks:  # activations to the next stage, gradients to the previous one
        per_micro.add("p2p", "pp", (not last) * local * h * a + (not first) * local * h * a, (not last) + (not first))
    for key, nbytes in per_micro.items():
        out.add(*key, nbytes * micro, per_micro.calls[key] * micro)
    if tp > 1 and chunks[-1][1]:  # the vocabulary-split loss: (max), then (sum, target) per loss row
        rows = t.global_batch_size * cfg.data.seq_len if loss_tokens is None else loss_tokens
        chunk = max(256, 2**22 // (m.vocab_size // tp))  # engine/train/loss.py's rows per chunk
        out.add("all-reduce", "tp", 3 * 4 * rows / (dp * cp), 2 * micro * -(-seq // chunk))
    _gradients(out, cfg, numel, dp * cp, edp, layers, chunks, per_slice)
    _scalars(out, cfg, world, dp, cp, tp * pp, pp * ep * etp, edp)
    return out


def _tensor_parallel(out: _Ledger, cfg, layers, chunks, seq: int, a: int, fwd: int) -> None:
    """SP: an all-gather into and a reduce-scatter out of every attention and MLP (shared expert
    included), mirrored in backward; without SP, all-reduces. The embedding reduce-scatters (or
    all-reduces) its output, and the LM head gathers its input."""
    p, m = cfg.parallel, cfg.model
    if p.tp == 1:
        return
    full = seq * m.hidden_size * a
    blocks = sum(1 + (not m.is_moe_layer(i) or m.shared_expert_intermediate_size > 0) for i in layers)
    edges = sum(first for first, _ in chunks[:1]) + sum(last for _, last in chunks[-1:])
    calls = (fwd + 1) * blocks + edges
    for kind in ("all-gather", "reduce-scatter") if p.sp else ("all-reduce",):
        out.add(kind, "tp", calls * full, calls)


def _context_parallel(out: _Ledger, cfg, n_layers: int, seq: int, a: int, fwd: int) -> None:
    p, m = cfg.parallel, cfg.model
    if p.cp == 1:
        return
    heads = m.num_kv_heads // p.tp if m.num_kv_heads >= p.tp else 1
    kv = 2 * seq * heads * m.resolved_head_dim
    if p.cp_mode == "ring":  # forward (cp-1) K/V hops; backward the same plus cp fp32 dK/dV hops
        out.add("p2p", "cp", n_layers * ((fwd + 1) * (p.cp - 1) * kv * a + p.cp * kv * 4),
                n_layers * ((fwd + 1) * (p.cp - 1) + p.cp))
    else:  # Ulysses: q, k, v and the output through all-to-alls, mirrored in backward
        q = seq * (m.num_heads // p.tp) * m.resolved_head_dim
        out.add("all-to-all", "cp", n_layers * (fwd + 1) * (2 * q + kv) * a * (p.cp - 1) / p.cp,
                n_layers * (fwd + 1) * 4)


def _experts(out: _Ledger, cfg, n_moe: int, tokens: int, a: int, fwd: int) -> None:
    """Dispatch over n = ep x etp ranks: each ep slot's rows go to its etp ranks, come back, and the
    backward mirrors both; a rank's rows for its own slot never leave it. Plus the int64 row counts,
    and the balancing counts [units, E] and sizes [units] of a microbatch split over tp x cp."""
    p, m = cfg.parallel, cfg.model
    if n_moe and p.tp * p.cp > 1 and m.moe.aux_loss_coeff > 0:
        units = cfg.train.micro_batch_size if m.moe.aux_loss_type == "seq" else 1
        out.add("all-reduce", "tp_cp", fwd * n_moe * units * (m.moe.num_experts + 1) * 4, fwd * n_moe)
    ep, etp = p.ep, p.resolved_etp
    n = ep * etp
    if not n_moe or n == 1:
        return
    rows = tokens * m.moe.top_k
    sent = rows * etp - rows // ep
    back = n * rows // ep - rows // ep
    out.add("all-to-all", "ep_etp", n_moe * ((sent + back) * m.hidden_size * a * (fwd + 1)
                                         + fwd * (n - 1) * (m.moe.num_experts // ep) * 8), n_moe * (3 * fwd + 2))


def _gradients(out: _Ledger, cfg, numel: dict, dp_cp: int, edp: int, layers, chunks, per_slice: bool) -> None:
    """Gradients over data parallelism (reduce-scatter + parameter all-gather with the distributed
    optimizer, else all-reduce), TP-partial gradients over tp, a tied embedding over its two stages."""
    p, m = cfg.parallel, cfg.model
    grad = _dtype_bytes(cfg.optim.grad_reduce_dtype or "fp32")
    param = _dtype_bytes(cfg.train.dtype)
    world = dp_cp * p.tp * p.pp
    for role, dim, size in (("dense", "dp_cp", dp_cp), ("expert", "edp", edp)):
        buckets = -(-numel.get(role, 0) * 4 // int(p.bucket_size_mb * 2**20))
        if size > 1 and cfg.distributed_optimizer(world):
            calls = buckets * (size if per_slice else 1)
            out.add("reduce-scatter", dim, numel.get(role, 0) * grad, calls)
            out.add("all-gather", dim, numel.get(role, 0) * param, calls)
        elif size > 1:
            out.add("all-reduce", dim, numel.get(role, 0) * grad, buckets)
    if p.tp > 1:  # with the distributed optimizer, each rank's share of them
        share = dp_cp if cfg.distributed_optimizer(world) else 1
        out.add("all-reduce", "tp", _tp_partial_numel(cfg, layers, chunks[-1][1]) * 4 / share)
    tied_stage = chunks[0][0] or chunks[-1][1]
    if m.tie_embeddings and p.pp > 1 and tied_stage:
        out.add("all-reduce", "pp", m.vocab_size // p.tp * m.hidden_size * 4)


def _tp_partial_numel(cfg, layers, has_head: bool) -> int:
    """Replicated weights whose gradient each TP rank holds a part of: norms under SP, q/k-norms,
    the router and the shared-expert gate (they see a slice of the tokens or heads)."""
    p, m = cfg.parallel, cfg.model
    n = (m.hidden_size if p.sp and has_head else 0)
    for i in layers:
        n += 2 * m.hidden_size * p.sp + 2 * m.resolved_head_dim * m.qk_norm
        if m.is_moe_layer(i):
            n += m.moe.num_experts * m.hidden_size
            n += m.hidden_size * bool(m.shared_expert_intermediate_size and m.moe.shared_expert_gate)
    return n


def _scalars(out: _Ledger, cfg, world: int, dp: int, cp: int, mp: int, emp: int, edp: int) -> None:
    """The step's loss-token count (dp), its loss (dp x cp), the pipeline's loss (pp), the grad norm's
    partial sums (model-parallel groups, then data-parallel ones with the distributed optimizer), and
    the MoE statistics table (fp64 [MoE layers, E + 3] over the world)."""
    m = cfg.model
    distributed = cfg.distributed_optimizer(world)
    out.add("all-reduce", "dp", 4 * (dp > 1))
    out.add("all-reduce", "dp_cp", 4 * (dp * cp > 1) + 4 * (distributed and dp * cp > 1))
    out.add("all-reduce", "pp", 4 * (cfg.parallel.pp > 1))
    out.add("all-reduce", "mp", 4 * (mp > 1))
    out.add("all-reduce", "emp", 4 * (emp > 1))
    out.add("all-reduce", "edp", 4 * (distributed and edp > 1))
    n_moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    out.add("all-reduce", "world", n_moe * (m.moe.num_experts + 3) * 8 * (world > 1))


def by_kind(traffic: dict) -> dict:
    """``expected_traffic``'s bytes summed per kind."""
    out = dict.fromkeys(KINDS, 0)
    for (kind, _), nbytes in traffic.items():
        out[kind] += nbytes
    return out
