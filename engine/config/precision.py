"""What each ``train.dtype`` means in torch dtypes: the one place a precision's name becomes dtypes.

Resolved on use: ``import loom.config`` stays light (no torch), so tools that only read configs start fast.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

# name -> (parameters, autocast, activations) as torch dtype names; None: no autocast.
_TABLE = {"fp32": ("float32", None, "float32"), "bf16": ("bfloat16", "bfloat16", "bfloat16")}
PRECISIONS = tuple(_TABLE)
# Gradients reduced over data parallel (optim.grad_reduce_dtype).
REDUCE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class Precision(NamedTuple):
    params: "torch.dtype"  # noqa: F821  the parameters the model computes with (fp32 masters live in the optimizer)
    compute: Optional["torch.dtype"]  # noqa: F821  autocast's dtype; None: no autocast, each op in its inputs' dtype
    activations: "torch.dtype"  # noqa: F821  hidden states between pipeline stages, and the LM head's matmul


def precision(name: str) -> Precision:
    import torch

    return Precision(*(None if d is None else getattr(torch, d) for d in _TABLE[name]))


def reduce_dtype(name: str):
    import torch

    return getattr(torch, REDUCE_DTYPES[name])
