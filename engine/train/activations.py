"""How many bytes of activations a forward keeps for backward, measured on any device.

``ActivationTracker`` counts the tensors autograd saves while a forward runs inside it (through
``torch.autograd.graph.saved_tensors_hooks``), each storage once, leaving out the parameters
(which are held anyway) and adding the inputs an activation checkpoint keeps for its recompute
(engine/model/recompute.py reports them). ``peak`` is the largest such total of one tracked
forward (``reset()`` starts the next one): the activations one microbatch holds at the end of its
forward, which is what recompute lowers. It is not an allocator peak: transient buffers inside an
op, and what a recompute briefly rebuilds in backward, are not in it. On CUDA the allocator's peak
(torch.cuda.max_memory_allocated) measures those too.
"""
from __future__ import annotations

from typing import Iterable

import torch

from engine.model import recompute


class ActivationTracker:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_key(t) for t in exclude}
        self._seen: set = set()
        self.bytes = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _add(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self._excluded or key in self._seen:
            return
        self._seen.add(key)
        self.bytes += _nbytes(t)
        self.peak = max(self.peak, self.bytes)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def _observe(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self._add(t)

    def reset(self) -> None:
        """Start counting the next forward (the previous one's activations are gone after its backward)."""
        self._seen.clear()
        self.bytes = 0

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
