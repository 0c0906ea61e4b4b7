"""How many bytes of activations a forward keeps for backward, measured on any device.

``ActivationTracker`` counts the tensors autograd saves while a forward runs inside it (through
``torch.autograd.graph.saved_tensors_hooks``), each storage once, leaving out the parameters (which
are held anyway) and adding the inputs an activation checkpoint keeps for its recompute
(engine/model/recompute.py reports them). Each is counted while it lives (until its graph runs
backward), so ``peak`` is the most bytes held for backward at once: one microbatch's at the end of
its forward under gradient accumulation, several under a pipeline schedule. It is not an allocator
peak: transient buffers inside an op, and what a recompute briefly rebuilds in backward, are not in
it. On CUDA the allocator's peak (torch.cuda.max_memory_allocated) measures those too.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch

from loom.model import recompute


class ActivationTracker:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_key(t) for t in exclude}
        self._holders: dict = {}  # storage key -> number of live saved tensors on it
        self._objects: set = set()  # ids of saved tensor objects already counted
        self.bytes = 0  # held now
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _add(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self._excluded or id(t) in self._objects:
            return
        self._objects.add(id(t))
        if self._holders.get(key, 0) == 0:
            self.bytes += _nbytes(t)
            self.peak = max(self.peak, self.bytes)
        self._holders[key] = self._holders.get(key, 0) + 1
        weakref.finalize(t, self._release, key, id(t), _nbytes(t))

    def _release(self, key, obj: int, nbytes: int) -> None:
        """A saved tensor was freed (its graph ran backward, or was dropped)."""
        self._objects.discard(obj)
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            self.bytes -= nbytes

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def _observe(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def __enter__(self) -> "ActivationTracker":
        self._hooks.__enter__()
        recompute.input_observers.append(self._observe)
        return self

    def __exit__(self, *exc) -> None:
        recompute.input_observers.remove(self._observe)
        self._hooks.__exit__(*exc)


def _key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    storage = t.untyped_storage()
    return (t.device.type, storage.data_ptr())


def _nbytes(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()
