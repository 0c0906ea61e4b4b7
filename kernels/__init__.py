"""Attention kernels behind one dispatch API (loom.kernels.dispatch): ``attention``, ``block_ops``.

The Triton varlen flash kernels (flash_attn), their plain-PyTorch twins (reference), the per-batch
block tables (block_table), the SDPA path (sdpa) and the flash-attn package's shim (_flash_shim).
"""
from __future__ import annotations

if __name__ == "loom.kernels":
    from loom.kernels.dispatch import (BACKENDS, AttentionOps, BlockTables, attention, block_ops,
                                       flash_attn_available, resolve_backend)

    __all__ = ["BACKENDS", "AttentionOps", "BlockTables", "attention", "block_ops", "flash_attn_available",
               "resolve_backend"]
else:  # imported as a top-level ``kernels`` from a checkout's root: hand the name to its owner
    from ._checkout import hand_over

    hand_over(__name__)
