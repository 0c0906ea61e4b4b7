"""Bytes moved by collectives: counted at the ``torch.distributed`` call boundary, and in theory.

``CollectiveCounter`` wraps torch.distributed's collective and point-to-point functions for as
long as it is active, so every call counts, whoever makes it: a stray or duplicated collective
shows up beside the theory instead of hiding behind Loom's own send sites. A call nested in
another counted one (``all_gather_single`` calling ``all_gather_into_tensor``) counts once.

Bytes per rank and call, one convention for the count and the theory:

    all-reduce      the tensor
    all-gather      the gathered output (``broadcast``: the tensor; gloo's all-gather of a
                    flat buffer is one broadcast per slice, which add up to the output)
    reduce-scatter  the input (``reduce``: the tensor, likewise per slice on gloo)
    all-to-all      the rows sent to other ranks (a rank's rows to itself never leave it)
    p2p             the tensors sent (receives are the sender's bytes already)

``expected_traffic`` predicts the same figures from the config and the layout alone. It models
tp = pp = cp = 1 exactly, token routing as uniform over the experts (what ``--routing balanced``
forces), and no capacity drops.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

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


class CollectiveCounter:
    """Bytes and calls per (kind, group ranks) on this rank while active (a context manager)."""

    def __init__(self):
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self.enabled = True
        self._depth = threading.local()
        self._saved = []

    def __enter__(self):
        for name in KIND:
            for module in (dist, c10d):
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth == 0 and self.enabled:
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                if dist.get_world_size(group) > 1:
                    key = (KIND[name], tuple(dist.get_process_group_ranks(group or c10d._get_default_group())))
                    self.bytes[key] += _bytes_of(name, args, kwargs, group)
                    self.calls[key] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
        return counted

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


def expected_traffic(cfg, world: int, numel: dict, steps: int = 1) -> dict:
    """Bytes per kind that one rank moves in ``steps`` training steps, from the layout alone.

    ``numel``: this rank's trainable elements by role, from its shard shapes: ``dense``
    (reduced over dp x cp) and ``expert`` (over the expert-data-parallel group). Models tp = pp = cp = 1
    (data and expert parallelism, with or without the distributed optimizer): the sequence-parallel
    and pipeline exchanges are not in it.
    """
    p, m, t = cfg.parallel, cfg.model, cfg.train
    if p.tp > 1 or p.pp > 1 or p.cp > 1:
        raise ValueError("expected_traffic models tp = pp = cp = 1 only")
    ep, etp = p.ep, p.resolved_etp
    dp = cfg.dp_size(world)
    edp = world // (ep * etp)
    act = _dtype_bytes(t.dtype)
    micro = t.global_batch_size // (dp * t.micro_batch_size)
    tokens = t.micro_batch_size * cfg.data.seq_len  # one microbatch's tokens on this rank
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    fwd = 2 if t.recompute == "full" else 1  # a full recompute replays each forward's exchanges
    out = dict.fromkeys(KINDS, 0)

    # Routed tokens: a dispatch group of n = ep x etp ranks; each ep slot's rows go to its etp ranks.
    n = ep * etp
    if moe_layers and n > 1:
        rows = tokens * m.moe.top_k  # every assignment kept; uniform over the ep slots
        sent = rows * etp - rows // ep  # rows for this rank's own slot stay here
        received_back = n * rows // ep - rows // ep  # what comes back, mirrored
        per_layer = (sent + received_back) * m.hidden_size * act * (fwd + 1)  # + the mirrors in backward
        per_layer += fwd * (n - 1) * (m.moe.num_experts // ep) * 8  # the int64 row counts of each dispatch
        out["all-to-all"] += per_layer * moe_layers * micro

    # Gradients and parameters over data parallelism.
    grad_bytes = _dtype_bytes(cfg.optim.grad_reduce_dtype or "fp32")
    param_bytes = act
    distributed = cfg.distributed_optimizer(world)
    for role, size in (("dense", dp), ("expert", edp)):
        if size > 1:
            if distributed:
                out["reduce-scatter"] += numel[role] * grad_bytes
                out["all-gather"] += numel[role] * param_bytes
            else:
                out["all-reduce"] += numel[role] * grad_bytes

    # Scalars: the step's loss-token count (dp), its loss (dp x cp), the grad norm's partial sums
    # (model-parallel groups, then data-parallel ones with the distributed optimizer), and the
    # MoE statistics table (fp64 [moe layers, E + 3] over the world).
    scalars = (dp > 1) + (dp > 1)
    scalars += distributed and dp > 1
    if numel.get("expert"):
        scalars += (ep * etp > 1) + (distributed and edp > 1)
    out["all-reduce"] += 4 * scalars
    if moe_layers and world > 1:
        out["all-reduce"] += moe_layers * (m.moe.num_experts + 3) * 8
    return {k: v * steps for k, v in out.items()}
