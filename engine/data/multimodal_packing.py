"""Sample packing: whole samples into ``seq_len`` sequences by first-fit decreasing.

Unlike the text pipeline (engine/data/packing.py), which cuts one token stream into windows,
a multimodal sample is never split: its images and its answer must stay in one attention
document. The plan depends only on the sample lengths, ``seq_len``, the seed and the window
size, never on the parallel layout, so every rank computes the same plan.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack item indices into bins of ``capacity`` by first-fit decreasing.

    Items are taken longest first (ties: lower index first); each goes into the lowest-numbered
    bin with room. A max-tree over bin free space finds that bin in O(log n), so a window of
    10^5 samples packs in about a second. Returns bins in creation order, items in insertion
    order. Every length must be in [1, capacity].
    """
    items, sizes = _ffd(np.asarray(lengths, np.int64), capacity)
    return [b.tolist() for b in np.split(items, np.cumsum(sizes)[:-1])] if len(items) else []


def _ffd(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """first_fit_decreasing as arrays: (item indices bin after bin, items per bin).

    Compact arrays instead of a list per bin and a Python object per item, so that packing
    millions of samples holds a few arrays of their size.
    """
    n = len(lengths)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > capacity))
    if len(bad):
        raise ValueError(f"item {bad[0]} has length {lengths[bad[0]]}, outside [1, capacity={capacity}]")
    order = np.argsort(-lengths, kind="stable")  # longest first, ties by index
    size = 1 << (n - 1).bit_length()  # leaves: one per potential bin
    free = array("q", bytes(16 * size))  # free[node] = max free space below node; unopened bins hold 0
    bin_of, opened = array("q"), 0
    for need in array("q", lengths[order].tobytes()):
        if free[1] >= need:
            node = 1
            while node < size:  # descend towards the leftmost leaf with room
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
        else:
            node, opened = opened + size, opened + 1
            free[node] = capacity
        bin_of.append(node - size)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    bins = np.frombuffer(bin_of, np.int64)
    return order[np.argsort(bins, kind="stable")], np.bincount(bins, minlength=opened)


@dataclass
class PackingPlan:
    """Which samples form each packed sequence.

    samples:     int64 ``[num_packed_samples]`` sample indices, sequence after sequence
    offsets:     int64 ``[num_sequences + 1]``; sequence s holds ``samples[offsets[s]:offsets[s+1]]``
    seq_len:     slots per sequence
    num_tokens:  real (non-padding) tokens over all sequences
    """

    samples: np.ndarray
    offsets: np.ndarray
    seq_len: int
    num_tokens: int

    @property
    def num_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def efficiency(self) -> float:
        """Real tokens over slots: ``num_tokens / (num_sequences * seq_len)``."""
        slots = self.num_sequences * self.seq_len
        return self.num_tokens / slots if slots else 0.0

    def sequence(self, s: int) -> np.ndarray:
        """Sample indices of sequence s, in packing order: int64 ``[k]``."""
        return self.samples[self.offsets[s]:self.offsets[s + 1]]

    def fingerprint(self) -> str:
        """Short hash of the plan; a resumed run checks it to refuse a differently packed dataset."""
        h = hashlib.sha256()
        h.update(np.int64(self.seq_len).tobytes())
        h.update(np.ascontiguousarray(self.samples, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.offsets, np.int64).tobytes())
        return h.hexdigest()[:16]


def pack_samples(lengths: Sequence[int], seq_len: int, seed: int, window: Optional[int] = None) -> PackingPlan:
    """Plan the packing of samples with the given token lengths.

    window=None packs the whole dataset at once (the seed is then unused: first-fit decreasing
    is a pure function of the lengths). Otherwise the samples are first put into a
    seeded random order (so each window mixes the whole dataset, not one file's region) and
    cut into consecutive windows of ``window`` samples, each packed by first-fit decreasing;
    only the last sequence of a window can be short of its neighbours' fill.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if window is None:
        order = np.arange(n, dtype=np.int64)
        window = max(n, 1)
    else:
        if window < 1:
            raise ValueError(f"packing window={window} must be >= 1")
        order = np.random.default_rng([seed, 0x9AC]).permutation(n).astype(np.int64)
    samples, sizes = [], []
    for start in range(0, n, window):
        chunk = order[start:start + window]
        items, counts = _ffd(lengths[chunk], seq_len)
        samples.append(chunk[items])
        sizes.append(counts)
    offsets = np.zeros(sum(len(k) for k in sizes) + 1, np.int64)
    np.cumsum(np.concatenate(sizes) if sizes else [], out=offsets[1:])
    return PackingPlan(np.concatenate(samples) if samples else np.zeros(0, np.int64), offsets, int(seq_len),
                       int(lengths.sum()))
