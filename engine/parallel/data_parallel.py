"""Bucketed data-parallel gradient reduction, overlapped with backward.

Each parameter's gradient is accumulated into an fp32 ``main_grad`` that lives inside a flat
bucket buffer (Megatron's layout: mixed precision keeps fp32 gradients whatever the compute
dtype). When every parameter of a bucket has its gradient for the last microbatch, the bucket's
all-reduce starts asynchronously while backward goes on. Buckets are launched strictly in order
so every rank issues the same collectives in the same sequence.

The loss is normalised by the global token count, so the reduction is a plain sum.

When neither group spans more than one rank there is nothing to reduce, and the buckets would
only cost an extra pass over every gradient (add into the bucket, zero it next step): the
gradients then stay where autograd accumulates them, as in plain PyTorch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.parallel import comm


class _Bucket:
    def __init__(self, params: list[nn.Parameter], device, group):
        self.params, self.group = params, group
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        self.ready = 0
        self.work = None


class GradBuffer:
    """Owns ``param.main_grad`` for every trainable parameter and reduces it over ``dp_group``.

    Usage per step: ``zero()``, then for each microbatch ``set_sync(is_last)`` + backward,
    then ``finish()``, after which ``param.grad`` is the reduced fp32 gradient.
    ``tp_group`` also sums the gradients marked ``tp_partial_grad`` (see tensor_parallel.py).
    Expert parameters (``param.is_expert``, see expert_parallel.py) are replicated only over
    ``expert_dp_group``: they get buckets of their own, reduced over that group.
    """

    def __init__(self, params: list[nn.Parameter], dp_group, tp_group=None, bucket_size_mb: float = 25.0,
                 expert_dp_group=None):
        self.params = [p for p in params if p.requires_grad]
        self.dp_group, self.tp_group, self.expert_dp_group = dp_group, tp_group, expert_dp_group
        if expert_dp_group is None and comm.group_size(dp_group) > 1 and any(_is_expert(p) for p in self.params):
            raise ValueError("GradBuffer: expert parameters need expert_dp_group")
        self.sync = True
        self.bucketed = comm.group_size(dp_group) > 1 or comm.group_size(expert_dp_group) > 1
        self.buckets = self._make_buckets(int(bucket_size_mb * 2**20 / 4)) if self.bucketed else []
        self._next = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params] \
            if self.bucketed else []

    def _make_buckets(self, max_numel: int) -> list[_Bucket]:
        groups = {False: self.dp_group, True: self.expert_dp_group}
        buckets, current, size = [], {False: [], True: []}, {False: 0, True: 0}
        # Reverse registration order approximates the order backward produces gradients.
        for p in reversed(self.params):
            kind = _is_expert(p)
            current[kind].append(p)
            size[kind] += p.numel()
            if size[kind] >= max_numel:
                buckets.append((current[kind], groups[kind]))
                current[kind], size[kind] = [], 0
        buckets += [(current[kind], groups[kind]) for kind in (False, True) if current[kind]]
        device = self.params[0].device
        out = [_Bucket(ps, device, group) for ps, group in buckets]
        for i, bucket in enumerate(out):
            offset = 0
            for p in bucket.params:
                p.main_grad = bucket.buffer[offset:offset + p.numel()].view(p.shape)
                p._loom_bucket = i
                offset += p.numel()
        return out

    def set_sync(self, sync: bool) -> None:
        """Reduce during the coming backward (the last microbatch) or only accumulate."""
        self.sync = sync

    def _on_grad(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if not self.sync:
            return
        bucket = self.buckets[param._loom_bucket]
        bucket.ready += 1
        self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if not force and bucket.ready < len(bucket.params):
                return
            if comm.group_size(bucket.group) > 1:
                bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)
            self._next += 1

    def finish(self) -> None:
        """Wait for every bucket (launching those whose parameters got no gradient), then set ``.grad``."""
        self._launch_ready(force=True)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        if not self.bucketed:
            for p in self.params:  # a parameter without a gradient still takes an AdamW step, as under DP
                p.main_grad = p.grad if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
        self._reduce_partial_over_tp()
        for p in self.params:
            p.grad = p.main_grad if p.dtype == torch.float32 else p.main_grad.to(p.dtype)

    def _reduce_partial_over_tp(self) -> None:
        partial = [p for p in self.params if getattr(p, "tp_partial_grad", False)]
        if not partial or comm.group_size(self.tp_group) == 1:
            return
        flat = torch.cat([p.main_grad.reshape(-1) for p in partial])
        dist.all_reduce(flat, group=self.tp_group)
        offset = 0
        for p in partial:
            p.main_grad.copy_(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()

    def zero(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()
            bucket.ready = 0
        for p in self.params:
            p.grad = None
            if not self.bucketed:  # drop last step's gradient now, not when the next one replaces it
                p.main_grad = None
        self._next = 0
        self.sync = True


def _is_expert(param: nn.Parameter) -> bool:
    return bool(getattr(param, "is_expert", False))
