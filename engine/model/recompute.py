"""Activation recompute (``train.recompute``): keep fewer activations, recompute them in backward.

- ``full``: whole decoder blocks run under ``torch.utils.checkpoint``: only a block's input is kept,
  and its forward runs again when backward reaches it (Megatron's ``--recompute-granularity full
  --recompute-method block``: the first ``train.recompute_layers`` blocks of each pipeline chunk,
  all when null).
- ``selective``: what is cheap to recompute and costly to keep: the attention core (its inputs q,
  k, v are kept, not its internals) and the routed experts' activation ``silu(gate) * up`` (the two
  GEMM outputs are kept, not the product), as Megatron's selective recompute of ``core_attn`` and
  ``moe_act``.

Recomputing replays the same operations on the same inputs, so losses and gradients are bitwise
those of ``none``. What a forward *records* must not happen twice: the MoE statistics check
``recomputing()``, which is true while a checkpointed region runs again in backward.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from loom.model import surface

_state = threading.local()
# Callbacks told about the tensors a checkpoint keeps for its recompute (its inputs): the activation
# tracker counts them (engine/train/activations.py), since they are held until backward.
input_observers: list[Callable[[list[torch.Tensor]], None]] = []


def recomputing() -> bool:
    """Whether the forward now running is a recompute in backward (record nothing a second time)."""
    return getattr(_state, "depth", 0) > 0


class _RecomputePhase:
    """Marks a recompute. Re-enterable, unlike a generator's context manager: a checkpoint may
    recompute more than once (a zero-bubble pipeline runs a block's backward in two passes)."""

    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc):
        _state.depth -= 1


def _contexts():
    return contextlib.nullcontext(), _RecomputePhase()


@torch.compiler.disable
def checkpointed(fn: Callable, *args):
    """``fn(*args)``, its activations dropped and recomputed in backward.

    Never traced by torch.compile (inside a compiled block it is a graph break). Dynamo would make
    the checkpoint a higher-order op of the graph, which needs its whole body in one graph (Loom's
    break at collectives, varlen attention and MoE layers) and takes only a selective-checkpoint
    policy as ``context_fn``: ours, which marks the recompute phase, fails there. Kept eager, the
    checkpoint replays exactly ``fn``, eager or explicitly compiled (engine/model/compile.py), and
    ``recomputing()`` holds for the eager code that records.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    kept = [a for a in args if torch.is_tensor(a)]
    for observe in input_observers:
        observe(kept)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def _wrap(obj, attr: str) -> None:
    """Replace ``obj.attr`` (a callable: a module's forward or a method) by its checkpointed self, once."""
    original = getattr(obj, attr)
    if getattr(original, "recomputed", False):
        return
    wrapped = functools.partial(checkpointed, original)
    wrapped.recomputed = True
    setattr(obj, attr, wrapped)


def replace_inner(obj, attr: str, transform: Callable[[Callable], Callable]) -> None:
    """Make ``obj.attr`` compute ``transform(fn)`` instead of ``fn``; a recompute wrapper stays outermost."""
    current = getattr(obj, attr)
    if not getattr(current, "recomputed", False):
        setattr(obj, attr, transform(current))
        return
    wrapped = functools.partial(checkpointed, transform(current.args[0]))
    wrapped.recomputed = True
    setattr(obj, attr, wrapped)


def _text_blocks(chunk: nn.Module) -> list[nn.Module]:
    return list(surface.blocks(surface.language_model(chunk)).values())


def all_blocks(chunk: nn.Module) -> list[nn.Module]:
    """The decoder's blocks, then a VLM's tower blocks (what this chunk holds of them)."""
    return _text_blocks(chunk) + surface.tower_blocks(chunk)


def apply_recompute(chunks: list[nn.Module], mode: str, layers: Optional[int] = None) -> None:
    """Make this rank's model chunks recompute as ``train.recompute`` says (see the module docstring)."""
    if mode == "none":
        return
    if mode not in ("selective", "full"):
        raise ValueError(f"recompute mode {mode!r} must be none, selective or full")
    for chunk in chunks:
        if mode == "full":
            blocks = _text_blocks(chunk)
            for block in blocks[:len(blocks) if layers is None else layers]:
                _wrap(block, "forward")
            continue
        for block in all_blocks(chunk):
            for module, s in surface.declared(block):
                for method in s.recompute:
                    _wrap(module, method)
