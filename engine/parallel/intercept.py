"""One boundary for every collective and point-to-point call: torch.distributed's own functions.

Loom reaches the network from several places (``comm.py``'s autograd Functions, the gradient
buckets, the pipeline's ``batch_isend_irecv``, checkpoint barriers). An ``Interceptor`` patches
torch.distributed's functions while it is active, so whatever watches the traffic (byte counts,
timeouts that name the collective, the pre-flight fingerprint) sees every call, whoever makes it,
without a hook at each call site. A call made inside an intercepted one (``all_gather_object``
calling ``all_gather``) goes straight through: each logical call is seen once.

``Call`` describes one call the same way on every rank: function, the group's global ranks,
the input's shape and dtype (None where it legitimately differs between ranks: split-size
all-to-alls, objects) and, for point-to-point, the peer's global rank.
"""
from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather_into_tensor", "all_gather_single", "all_gather",
               "reduce_scatter_tensor", "reduce_scatter_single", "reduce_scatter", "all_to_all_single", "all_to_all",
               "gather", "scatter", "barrier", "monitored_barrier", "all_gather_object", "broadcast_object_list",
               "gather_object", "scatter_object_list")
POINT_TO_POINT = ("send", "isend", "recv", "irecv", "batch_isend_irecv")
SENDS = ("send", "isend")
# The argument that holds what a rank contributes, per function (torch's own parameter names).
_INPUTS = ("input_tensor", "input", "input_tensor_list", "input_list", "tensor", "obj")
# Calls whose input shape may differ between ranks by design.
_VARIABLE = ("all_to_all", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")


@dataclass(frozen=True)
class Call:
    name: str
    group: tuple[int, ...]
    shape: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    peer: Optional[int] = None  # point-to-point: the other side's global rank

    @property
    def sends(self) -> bool:
        return self.name in SENDS

    def signature(self) -> tuple:
        """What two ranks must agree on: the function and its input (the group is where it ran)."""
        return (self.name, self.shape, self.dtype)

    def __str__(self) -> str:
        what = f"{self.dtype}[{', '.join(map(str, self.shape))}]" if self.shape is not None else "variable size"
        where = f"to rank {self.peer}" if self.sends else f"from rank {self.peer}" if self.peer is not None else ""
        return f"{self.name} of {what}" + (f" {where}" if where else "")


class Interceptor:
    """Patches torch.distributed's collective and point-to-point functions while active (a context
    manager); subclasses override ``call``. ``names`` limits which functions are patched."""

    names: tuple[str, ...] = COLLECTIVES + POINT_TO_POINT

    def __init__(self):
        self._local = threading.local()
        self._saved: list[tuple[Any, str, Callable]] = []

    def call(self, name: str, fn: Callable, args: tuple, kwargs: dict):
        return fn(*args, **kwargs)

    def __enter__(self):
        wrapped = {}  # one wrapper per function: P2POp checks its op against distributed_c10d's isend
        for name in self.names:
            for module in (dist, c10d):
                fn = getattr(module, name, None)
                if fn is not None:
                    self._saved.append((module, name, fn))
                    setattr(module, name, wrapped.setdefault(id(fn), self._wrap(name, fn)))
        return self

    def __exit__(self, *exc):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def _wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def intercepted(*args, **kwargs):
            if getattr(self._local, "busy", False):
                return fn(*args, **kwargs)
            self._local.busy = True
            try:
                return self.call(name, fn, args, kwargs)
            finally:
                self._local.busy = False
        return intercepted


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def arguments(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by torch's parameter names."""
    return _signature(fn).bind_partial(*args, **kwargs).arguments


def call_group(bound: dict):
    group = bound.get("group")
    return group if group is not None else c10d._get_default_group()


def describe(name: str, fn: Callable, args: tuple, kwargs: dict) -> list[Call]:
    """The call(s) a torch.distributed function call makes: one, or one per ``P2POp``."""
    bound = arguments(fn, args, kwargs)
    if name == "batch_isend_irecv":
        return [_p2p_call(op.op.__name__, op.tensor, op.group, op.peer)
                for op in bound["p2p_op_list"]]
    group = call_group(bound)
    if name in POINT_TO_POINT:
        peer = next((bound[k] for k in ("dst", "src") if bound.get(k) is not None), None)
        if peer is None:
            local = next(bound[k] for k in ("group_dst", "group_src") if bound.get(k) is not None)
            peer = dist.get_global_rank(group, local)
        return [_p2p_call(name, bound["tensor"], group, peer)]
    ranks = tuple(dist.get_process_group_ranks(group))
    given = next((bound[k] for k in _INPUTS if k in bound), None)
    variable = name in _VARIABLE or (name == "all_to_all_single" and (bound.get("input_split_sizes")
                                                                       or bound.get("output_split_sizes")))
    if variable or not isinstance(given, torch.Tensor):
        return [Call(name, ranks, dtype=_dtype(given))]
    return [Call(name, ranks, tuple(given.shape), _dtype(given))]


def _p2p_call(name: str, tensor: torch.Tensor, group, peer: int) -> Call:
    return Call(name, tuple(dist.get_process_group_ranks(group)), tuple(tensor.shape), _dtype(tensor), int(peer))


def _dtype(value) -> Optional[str]:
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    return str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else None
