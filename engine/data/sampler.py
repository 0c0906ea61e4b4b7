"""Global batches that depend only on the step, and each DP rank's microbatches.

The global batch of a step is a pure function of (num_samples, global_batch_size, seed,
shuffle, step). Ranks slice it; they never draw their own indices. So a run resumed
under a different DP / microbatch layout sees exactly the same token stream, and the
sampler needs no checkpointed state beyond the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from loom.data.packing import IGNORE_INDEX, PackedDataset, Sample


class GlobalBatchSampler:
    """Epoch-wise permutations of range(num_samples), cut into global batches.

    Each epoch consumes ``np.random.default_rng([seed, epoch]).permutation(num_samples)``
    (or ``arange`` without shuffle); the incomplete tail of an epoch is dropped; epochs cycle
    forever.
    """

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has num_samples={num_samples} samples, fewer than global_batch_size={global_batch_size}"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (numpy SeedSequence)")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._cached: tuple[int, np.ndarray] | None = None  # (epoch, order): pure memo, not state

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample order of an epoch: int64 ``[num_samples]``."""
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached = (epoch, order.astype(np.int64))
        return self._cached[1]

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step``: int64 ``[global_batch_size]``."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        b = self.global_batch_size
        return self.epoch_order(epoch)[k * b : (k + 1) * b].copy()


@dataclass
class Microbatch:
    """Packed (THD) microbatch: ``num_sequences`` windows concatenated, T = num_sequences * seq_len.

    input_ids:  int64 ``[T]``
    labels:     int64 ``[T]``, IGNORE_INDEX (-100) where no loss is taken
    positions:  int32 ``[T]``, restarting at 0 in each document
    cu_seqlens: int32 ``[num_docs + 1]``, 0 .. T, over all documents of all sequences
    pixel_values:       multimodal only: float32 ``[num_images, 3, H, W]``, in the order of
                        their placeholder tokens in input_ids (engine/data/multimodal.py)
    image_token_counts: multimodal only: int64 ``[num_images]``, placeholder tokens per image
    image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: a native-resolution
                        tower's (engine/data/multimodal_native.py); pixel_values are then flattened patches
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_sequences: int
    num_loss_tokens: int
    pixel_values: Optional[torch.Tensor] = None
    image_token_counts: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    pixel_values_videos: Optional[torch.Tensor] = None
    video_grid_thw: Optional[torch.Tensor] = None
    second_per_grid_ts: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Microbatch":
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


def collate(samples: Sequence[Sample]) -> Microbatch:
    """Concatenate samples (all of one seq_len) into a packed Microbatch."""
    if not samples:
        raise ValueError("collate: got no samples")
    seq_lens = {len(s.input_ids) for s in samples}
    if len(seq_lens) != 1:
        raise ValueError(f"collate: samples have different lengths {sorted(seq_lens)}")
    labels = np.concatenate([s.labels for s in samples])
    doc_lens = np.concatenate([s.doc_lens for s in samples]).astype(np.int64)
    cu_seqlens = np.zeros(len(doc_lens) + 1, dtype=np.int32)
    np.cumsum(doc_lens, out=cu_seqlens[1:])
    return Microbatch(
        input_ids=torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int64)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        positions=torch.from_numpy(np.concatenate([s.positions for s in samples]).astype(np.int32)),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=int(doc_lens.max()),
        num_sequences=len(samples),
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
    )


def rank_slice(global_indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int) -> list[int]:
    """The contiguous slice ``global_indices[dp_rank*n:(dp_rank+1)*n]``, ``n = len // dp_size``, of DP rank
    ``dp_rank``."""
    g = len(global_indices)
    if dp_size < 1 or micro_batch_size < 1:
        raise ValueError(f"dp_size={dp_size} and micro_batch_size={micro_batch_size} must be >= 1")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if g % (dp_size * micro_batch_size):
        raise ValueError(
            f"global batch of {g} sequences is not divisible by dp_size={dp_size} * "
            f"micro_batch_size={micro_batch_size} = {dp_size * micro_batch_size}"
        )
    n = g // dp_size
    return [int(i) for i in global_indices[dp_rank * n : (dp_rank + 1) * n]]


def rank_microbatches(
    dataset: PackedDataset, global_indices: Sequence[int], dp_rank: int, dp_size: int, micro_batch_size: int
) -> list[Microbatch]:
    """This DP rank's microbatches of a global batch.

    The rank takes the contiguous slice ``global_indices[dp_rank*n:(dp_rank+1)*n]``,
    ``n = len(global_indices) // dp_size``, split in order into microbatches of
    ``micro_batch_size`` sequences. Concatenating all ranks' microbatches in rank order
    reproduces the global batch in order, whatever the layout.
    """
    mine = rank_slice(global_indices, dp_rank, dp_size, micro_batch_size)
    return [
        collate([dataset[int(i)] for i in mine[k : k + micro_batch_size]])
        for k in range(0, len(mine), micro_batch_size)
    ]
