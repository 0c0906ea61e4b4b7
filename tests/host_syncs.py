"""Count, on CPU, the calls that make the host wait for the device on a GPU.

Reading a CUDA tensor's values on the host waits for every kernel queued before it; in a training
step's hot path that drains the launch queue. On CPU nothing waits, so ``count_host_syncs`` counts
the calls instead, by wrapping them for the duration of a ``with`` block:

  * reading values: ``Tensor.item``, ``tolist``, ``__int__``, ``__float__``, ``__bool__``,
    ``__index__``, ``cpu``, ``numpy``, ``__array__``;
  * ops whose output size depends on the values: ``torch.nonzero`` / ``Tensor.nonzero``,
    ``argwhere``, ``masked_select``, one-argument ``torch.where``, ``torch.unique``, indexing or
    assigning with a boolean mask, ``torch.repeat_interleave`` with tensor repeats and no
    ``output_size``;
  * ops that read the values to size their output or answer a host bool: ``torch.bincount``
    (CUDA reads the extremes), ``torch.equal``, ``torch.allclose``.

Not seen: syncs inside other C++ ops (none of the ops on these paths has one on CUDA as far as
their implementations show), ``Tensor.to("cpu")`` (on a CPU run it cannot be told from the
``.to(device)`` that is a host-to-device copy on a GPU), copies from pageable host memory, and
waits inside collectives. Calls made by the Triton interpreter are skipped: it stands in for the GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter

import torch

_TRITON = None


def _from_triton(frame) -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            import triton
            _TRITON = os.path.dirname(triton.__file__)
        except ImportError:
            _TRITON = "\0"
    while frame is not None:
        if frame.f_code.co_filename.startswith(_TRITON):
            return True
        frame = frame.f_back
    return False


def _caller(frame) -> str:
    """The innermost frame outside torch and this module: where the sync was asked for."""
    here = os.path.abspath(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None:
        name = frame.f_code.co_filename
        if name != here and not name.startswith(torch_dir):
            return f"{os.path.relpath(name)}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostSyncs:
    """What ``count_host_syncs`` recorded: ``calls`` (op, caller) in order; ``len()`` the total."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.calls)

    def by_caller(self) -> Counter:
        return Counter(f"{op} at {where}" for op, where in self.calls)

    def __repr__(self) -> str:
        lines = [f"{n} x {call}" for call, n in self.by_caller().most_common()]
        return f"{len(self)} host syncs" + "".join("\n  " + line for line in lines)


def _always(*args, **kwargs) -> bool:
    return True


# (owner, attribute, predicate on the call's arguments: does this call sync?)
_WATCHED = [
    *((torch.Tensor, name, _always) for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__",
                                                "cpu", "numpy", "__array__", "nonzero", "argwhere",
                                                "masked_select", "unique")),
    *((torch, name, _always) for name in ("nonzero", "argwhere", "masked_select", "unique", "bincount", "equal",
                                          "allclose")),
    (torch.Tensor, "bincount", _always),
    (torch, "where", lambda *a, **k: len(a) + len(k) == 1),
    (torch.Tensor, "__getitem__", lambda self, index: _has_bool_mask(index)),
    (torch.Tensor, "__setitem__", lambda self, index, value: _has_bool_mask(index)),
    (torch, "repeat_interleave",
     lambda x, repeats=None, dim=None, *, output_size=None: output_size is None
     and (repeats is None or isinstance(repeats, torch.Tensor))),
    (torch.Tensor, "repeat_interleave",
     lambda self, repeats, dim=None, *, output_size=None: output_size is None and isinstance(repeats, torch.Tensor)),
]


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as syncs:`` ... ``len(syncs)``; nested calls count once (the outer one)."""
    record = HostSyncs()
    depth = [0]
    originals = []

    def wrap(name, syncs, original):
        def wrapper(*args, **kwargs):
            if depth[0] == 0 and syncs(*args, **kwargs):
                frame = sys._getframe(1)
                if not _from_triton(frame):
                    record.calls.append((name, _caller(frame)))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    for owner, name, syncs in _WATCHED:
        originals.append((owner, name, owner.__dict__.get(name)))  # None: inherited, restored by deleting
        setattr(owner, name, wrap(name, syncs, getattr(owner, name)))
    try:
        yield record
    finally:
        for owner, name, saved in reversed(originals):
            if saved is None:
                delattr(owner, name)
            else:
                setattr(owner, name, saved)
