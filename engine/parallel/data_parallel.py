"""Parameters and fp32 gradients in flat buckets; data-parallel reduction overlapped with backward.

Megatron's layout (``ParamAndGradBuffer``): the trainable parameters of a rank live as views
inside flat per-bucket buffers, one for the parameters (their own dtype, bf16 or fp32) and one
for the gradients (always fp32: ``train.dtype=bf16`` accumulates microbatches in fp32). Autograd's
gradient is added into the bucket as soon as it exists and then dropped. When every parameter of
a bucket has its gradient for the last microbatch, the bucket's reduction starts asynchronously
while backward goes on. Buckets are launched strictly in order so every rank issues the same
collectives in the same sequence.

- Plain data parallelism all-reduces a bucket: every rank ends with the whole reduced gradient.
- The distributed optimizer reduce-scatters it: rank ``r`` of the bucket's group ends with the
  reduced ``r``-th equal slice (its *shard*), which is all its optimizer needs; after the step,
  ``all_gather_params`` sends every rank the updated parameters of every slice.

The loss is normalised by the global token count, so the reduction is a plain sum. Expert weights
(``ParamSpec.expert``) are replicated only over the expert-data-parallel group: they get buckets of
their own, reduced over that group. The last pipeline stage's copy of a tied embedding has a bucket
of its own, summed with the first stage's before the data-parallel reduction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from loom.parallel import comm
from loom.parallel.sharding import spec_of

_ALIGN = 64  # elements: every shard starts 256-byte aligned


@dataclass
class Bucket:
    params: list[nn.Parameter]
    group: object  # the data-parallel group its gradients are reduced over
    sharded: bool  # reduce-scatter (distributed optimizer) rather than all-reduce
    offsets: dict = field(default_factory=dict)  # id(param) -> (start, end) in the flat buffers
    numel: int = 0  # padded: a multiple of _ALIGN * group size
    param_data: Optional[torch.Tensor] = None
    grad_data: Optional[torch.Tensor] = None
    ready: int = 0
    work: object = None

    @property
    def shard(self) -> tuple[int, int]:
        """This rank's slice ``[start, end)`` of the flat buffers: its optimizer's share."""
        if not self.sharded:
            return 0, self.numel
        n, r = comm.group_size(self.group), comm.group_rank(self.group)
        size = self.numel // n
        return r * size, (r + 1) * size


@dataclass(frozen=True)
class Piece:
    """The part of one parameter inside its bucket's shard: flat elements ``[lo, hi)`` of the
    (local) parameter, at ``[start, end)`` of the bucket's buffers."""

    param: nn.Parameter
    bucket: Bucket
    lo: int
    hi: int
    start: int
    end: int


class GradBuffer:
    """Owns every trainable parameter's storage and fp32 gradient; reduces gradients over data parallel.

    Usage per step: ``zero()``, then for each microbatch ``set_sync(is_last)`` + backward, then
    ``finish()``, after which each bucket's shard holds the reduced gradient (``grad(piece)``; the
    whole local gradient without the distributed optimizer). ``tp_group`` also sums the gradients
    whose spec says ``tp_partial_grad``. Parameters may be on the meta device: their storage is
    allocated here, on ``device``, and their values are the caller's to fill.
    """

    def __init__(self, params: list[nn.Parameter], dp_group, tp_group=None, bucket_size_mb: float = 25.0,
                 expert_dp_group=None, *, device=None, distributed: bool = False, tied=(None, None),
                 reduce_dtype: torch.dtype = torch.float32):
        self.params = [p for p in params if p.requires_grad]
        self.dp_group, self.tp_group, self.expert_dp_group = dp_group, tp_group, expert_dp_group
        if expert_dp_group is None and comm.group_size(dp_group) > 1 and any(_is_expert(p) for p in self.params):
            raise ValueError("GradBuffer: expert parameters need expert_dp_group")
        self.distributed, self.reduce_dtype = distributed, reduce_dtype
        self.tied_param, self.tied_group = tied
        self.device = torch.device(device) if device is not None else (self.params[0].device if self.params else None)
        self.sync = True
        self.buckets = self._make_buckets(int(bucket_size_mb * 2**20 / 4))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    # ------------------------------------------------------------------ layout

    def _make_buckets(self, max_numel: int) -> list[Bucket]:
        groups = {False: self.dp_group, True: self.expert_dp_group}
        buckets, current, size = [], {False: [], True: []}, {False: 0, True: 0}
        tied = [p for p in self.params if p is self.tied_param]
        # Reverse registration order approximates the order backward produces gradients.
        for p in reversed(self.params):
            if p is self.tied_param:
                continue
            kind = _is_expert(p)
            current[kind].append(p)
            size[kind] += p.numel()
            if size[kind] >= max_numel:
                buckets.append((current[kind], groups[kind]))
                current[kind], size[kind] = [], 0
        buckets += [(current[kind], groups[kind]) for kind in (False, True) if current[kind]]
        buckets += [(tied, self.dp_group)] if tied else []  # last: reduced once the tied sum is done
        return [self._allocate(ps, group) for ps, group in buckets]

    def _allocate(self, params: list[nn.Parameter], group) -> Bucket:
        bucket = Bucket(params, group, sharded=self.distributed and comm.group_size(group) > 1)
        offset = 0
        for p in params:
            bucket.offsets[id(p)] = (offset, offset + p.numel())
            offset += p.numel()
        quantum = _ALIGN * comm.group_size(group)
        bucket.numel = -(-offset // quantum) * quantum
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"a gradient bucket mixes parameter dtypes {sorted(map(str, dtypes))}")
        bucket.param_data = torch.zeros(bucket.numel, dtype=dtypes.pop(), device=self.device)
        bucket.grad_data = torch.zeros(bucket.numel, dtype=torch.float32, device=self.device)
        for p in params:
            start, end = bucket.offsets[id(p)]
            view = bucket.param_data[start:end].view(p.shape)
            if not p.is_meta:
                view.copy_(p.data)
            place(p, view)  # the parameter now lives in the bucket (all_gather_params writes there)
        return bucket

    def pieces(self) -> list[Piece]:
        """Every parameter's part in this rank's shards, bucket by bucket: what the optimizer updates."""
        out = []
        for bucket in self.buckets:
            lo, hi = bucket.shard
            for p in bucket.params:
                start, end = bucket.offsets[id(p)]
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    out.append(Piece(p, bucket, a - start, b - start, a, b))
        return out

    # ------------------------------------------------------------------ one step

    def set_sync(self, sync: bool) -> None:
        """Reduce during the coming backward (the last microbatch) or only accumulate."""
        self.sync = sync

    def _on_grad(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        start, end = bucket.offsets[id(param)]
        bucket.grad_data[start:end].add_(param.grad.reshape(-1))
        param.grad = None
        if self.sync:
            bucket.ready += 1
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.params[0] is self.tied_param:
                return  # finish() launches it after the tied sum
            if not force and bucket.ready < len(bucket.params):
                return
            self._reduce(bucket)
            self._next += 1

    def _reduce(self, bucket: Bucket) -> None:
        if comm.group_size(bucket.group) == 1:
            return
        if self.reduce_dtype != torch.float32:  # a lower-precision wire: reduce a copy, synchronously
            data = bucket.grad_data.to(self.reduce_dtype)
            _reduce_flat(data, bucket, async_op=False)
            lo, hi = bucket.shard
            bucket.grad_data[lo:hi].copy_(data[lo:hi])
            return
        bucket.work = _reduce_flat(bucket.grad_data, bucket, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching those whose parameters got no gradient), sum the tied
        copies and the TP-partial gradients: each shard then holds its reduced fp32 gradient."""
        self._launch_ready(force=True)
        if self._next < len(self.buckets):  # the tied bucket
            bucket = self.buckets[self._next]
            start, end = bucket.offsets[id(self.tied_param)]
            if self.tied_group is not None:
                dist.all_reduce(bucket.grad_data[start:end], group=self.tied_group)
            self._reduce(bucket)
            self._next += 1
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        self._reduce_partial_over_tp()

    def _reduce_partial_over_tp(self) -> None:
        if comm.group_size(self.tp_group) == 1:
            return
        parts = [self.grad(piece) for piece in self.pieces() if spec_of(piece.param).tp_partial_grad]
        if not parts:
            return
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.tp_group)
        offset = 0
        for part in parts:
            part.copy_(flat[offset:offset + part.numel()])
            offset += part.numel()

    def bucket_of(self, param: nn.Parameter) -> Bucket:
        return self._bucket_of[id(param)]

    def grad(self, piece: Piece) -> torch.Tensor:
        """The reduced fp32 gradient of ``piece`` (a flat view into the bucket)."""
        return piece.bucket.grad_data[piece.start:piece.end]

    def zero(self) -> None:
        for bucket in self.buckets:
            bucket.grad_data.zero_()
            bucket.ready = 0
        for p in self.params:
            p.grad = None
        self._next = 0
        self.sync = True

    def all_gather_params(self) -> None:
        """After the optimizer updated this rank's shards: every rank gets every bucket's parameters."""
        for bucket in self.buckets:
            if bucket.sharded:
                lo, hi = bucket.shard
                comm.all_gather_flat(bucket.param_data, bucket.param_data[lo:hi], bucket.group)

    # ------------------------------------------------------------------ inspection

    def local_grad(self, param: nn.Parameter) -> torch.Tensor:
        """``param``'s whole reduced local gradient, fp32 (tests, tools). With the distributed
        optimizer this gathers the bucket's shards: collective over the bucket's group."""
        bucket = self._bucket_of[id(param)]
        data = bucket.grad_data
        if bucket.sharded:
            lo, hi = bucket.shard
            data = torch.empty_like(data)
            comm.all_gather_flat(data, bucket.grad_data[lo:hi].clone(), bucket.group)
        start, end = bucket.offsets[id(param)]
        return data[start:end].view(param.shape)


def place(param: nn.Parameter, data: torch.Tensor) -> None:
    """Make ``param`` (the same Python object: modules, hooks and specs keep referring to it) use
    ``data`` as its storage, even from the meta device, where ``param.data = ...`` is refused."""
    if param.device == data.device:
        param.data = data
        return
    new = nn.Parameter(data, requires_grad=param.requires_grad)
    torch.utils.swap_tensors(param, new)
    param.__dict__.update(new.__dict__)  # swap_tensors swapped the attributes too: take them back


def _reduce_flat(data: torch.Tensor, bucket: Bucket, async_op: bool):
    if bucket.sharded:
        lo, hi = bucket.shard
        return comm.reduce_scatter_flat(data[lo:hi], data, bucket.group, async_op=async_op)
    return dist.all_reduce(data, group=bucket.group, async_op=async_op)


def _is_expert(param: nn.Parameter) -> bool:
    return spec_of(param).expert
