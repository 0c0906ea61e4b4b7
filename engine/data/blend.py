"""Text corpora from config: one corpus (synthetic, a ``.npy`` token file or an indexed dataset), or a
weighted blend of several.

A blend packs each corpus into ``seq_len`` windows as a single corpus would be, and lays the
corpora's windows end to end: dataset index ``offsets[j] + w`` is window ``w`` of corpus ``j``. Its
sampler maps the global sample index ``g`` (``step * global_batch_size + k``) to such an index:

1. the corpus: Megatron's blending rule, run over a fixed period of ``PERIOD`` samples and repeated:
   sample ``i`` of the period goes to the corpus whose realised count lags its target
   ``weight * max(i, 1)`` most (ties to the first listed). Every window of samples then holds each
   corpus within a sample or two of its share, and the period makes the rule O(1) per sample
   instead of a pass over every sample before ``g``;
2. the window: the next one that corpus has not served, in its own seeded order (a fresh
   permutation per pass over it, ``np.random.default_rng([seed, j, epoch])``; ``arange`` without
   shuffle), so a corpus smaller than its share wraps into a new epoch and a larger one is read on.

Both steps depend on (seed, weights, corpus sizes, g) only, never on the layout, the micro batch
size or what was sampled before, so a resume at any step under any layout continues the stream.
Memory is the period's table and one permutation per corpus in use: O(windows), never O(tokens).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import numpy as np

from loom.config import ConfigError, DataConfig
from loom.data.indexed import IndexedReader
from loom.data.packing import PackedDataset, Sample
from loom.data.sampler import GlobalBatchSampler
from loom.data.tokens import TokenCorpus, check_vocab, load_token_file, synthetic_corpus

PERIOD = 1 << 16


def load_corpus(path: str | os.PathLike) -> TokenCorpus:
    """A ``.npy`` token file (with ``.idx.npy``) or the prefix of an indexed dataset, memory-mapped."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return load_token_file(path)
    return IndexedReader(path).corpus()


def blend_pattern(weights: Sequence[float], period: int = PERIOD) -> tuple[np.ndarray, np.ndarray]:
    """(corpus of each sample of a period, int64 ``[period]``; samples per corpus per period ``[K]``).

    Megatron's ``build_blending_indices``: sample ``i`` goes to ``argmax_j(w_j * max(i, 1) - count_j)``.
    Read-only arrays, shared between callers.
    """
    return _blend_pattern(tuple(float(x) for x in weights), int(period))


@functools.lru_cache(maxsize=4)  # a Python loop over the period: build it once per blend, not per sampler
def _blend_pattern(weights: tuple[float, ...], period: int) -> tuple[np.ndarray, np.ndarray]:
    w = list(weights)
    total = sum(w)
    w = [x / total for x in w]
    counts = [0] * len(w)
    choice = np.empty(period, dtype=np.int64)
    for i in range(period):
        scale = max(i, 1)
        best, best_error = 0, w[0] * scale - counts[0]
        for j in range(1, len(w)):
            error = w[j] * scale - counts[j]
            if error > best_error:
                best, best_error = j, error
        choice[i] = best
        counts[best] += 1
    per_period = np.array(counts, dtype=np.int64)
    choice.flags.writeable = per_period.flags.writeable = False
    return choice, per_period


class BlendedSampler:
    """Global batches of a blend: ``indices(step)`` are dataset indices of ``BlendedDataset``."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], global_batch_size: int, seed: int,
                 shuffle: bool = True, period: int = PERIOD):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"BlendedSampler: {len(sizes)} corpus sizes for {len(weights)} weights")
        if global_batch_size < 1 or seed < 0:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1 and seed={seed} >= 0")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)
        self.global_batch_size, self.seed, self.shuffle = int(global_batch_size), int(seed), bool(shuffle)
        self.period = int(period)
        self.pattern, self.per_period = blend_pattern(weights, period)
        # rank[i]: how many samples of its corpus come before sample i within the period.
        self.rank = np.zeros(period, dtype=np.int64)
        for j in range(len(sizes)):
            mine = self.pattern == j
            self.rank[mine] = np.arange(int(mine.sum()))
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # pure memo, not state

    def order(self, corpus: int, epoch: int) -> np.ndarray:
        """Window order of one pass over ``corpus``: int64 ``[size]``."""
        key = (corpus, epoch)
        if key not in self._orders:
            n = int(self.sizes[corpus])
            if self.shuffle:
                order = np.random.default_rng([self.seed, corpus, epoch]).permutation(n).astype(np.int64)
            else:
                order = np.arange(n, dtype=np.int64)
            stale = [k for k in self._orders if k[0] == corpus and k[1] < epoch - 1]
            for k in stale:  # a batch reaches back at most one epoch; older passes are never read again
                del self._orders[k]
            self._orders[key] = order
        return self._orders[key]

    def source(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, its draw number) of global sample indices: the corpus' ``k``-th window served."""
        cycle, i = np.divmod(np.asarray(samples, dtype=np.int64), self.period)
        corpus = self.pattern[i]
        return corpus, cycle * self.per_period[corpus] + self.rank[i]

    def samples(self, samples: np.ndarray) -> np.ndarray:
        """Dataset indices of global sample indices."""
        corpus, draw = self.source(samples)
        out = np.empty(len(corpus), dtype=np.int64)
        epoch, position = np.divmod(draw, self.sizes[corpus])
        for j, e in sorted(set(zip(corpus.tolist(), epoch.tolist()))):
            mine = (corpus == j) & (epoch == e)
            out[mine] = self.offsets[j] + self.order(j, e)[position[mine]]
        return out

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step``: int64 ``[global_batch_size]``."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        b = self.global_batch_size
        return self.samples(np.arange(int(step) * b, (int(step) + 1) * b, dtype=np.int64))


class BlendedDataset:
    """Several packed corpora end to end; ``sampler`` draws from them by weight."""

    def __init__(self, datasets: Sequence[PackedDataset], weights: Sequence[float], names: Sequence[str] = ()):
        self.datasets, self.weights = list(datasets), [float(w) for w in weights]
        self.names = list(names) or [f"corpus {j}" for j in range(len(self.datasets))]
        self.sizes = [len(d) for d in self.datasets]
        self.offsets = np.concatenate(([0], np.cumsum(self.sizes))).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(corpus, window) of dataset index ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"BlendedDataset index {i} out of range for {len(self)} samples")
        j = int(np.searchsorted(self.offsets, i, "right")) - 1
        return j, int(i - self.offsets[j])

    def __getitem__(self, i: int) -> Sample:
        j, w = self.locate(int(i))
        return self.datasets[j][w]

    def sampler(self, global_batch_size: int, seed: int, shuffle: bool = True) -> BlendedSampler:
        return BlendedSampler(self.sizes, self.weights, global_batch_size, seed, shuffle)


def build_text_dataset(data: DataConfig, vocab_size: int, seed: int) -> PackedDataset | BlendedDataset:
    """The packed text dataset ``data`` describes; token ids are checked against ``vocab_size``."""
    if data.blend is None:
        if data.source == "synthetic":
            corpus = synthetic_corpus(vocab_size, data.num_tokens, seed=seed)
        else:
            corpus = load_corpus(data.source)
            check_vocab(corpus, vocab_size, f"data.source={data.source}")
        return PackedDataset(corpus, data.seq_len)
    datasets = []
    for k, (weight, path) in enumerate(data.blend):
        where = f"data.blend[{k}] {path}"
        corpus = load_corpus(path)
        check_vocab(corpus, vocab_size, where)
        dataset = PackedDataset(corpus, data.seq_len)
        if len(dataset) == 0:
            raise ConfigError(f"{where}: {corpus.num_tokens} tokens, fewer than one data.seq_len={data.seq_len} window")
        datasets.append(dataset)
    blend = BlendedDataset(datasets, [w for w, _ in data.blend], [p for _, p in data.blend])
    starved = [k for k, n in enumerate(blend.sampler(1, seed).per_period) if n == 0]
    if starved:
        k = starved[0]
        raise ConfigError(f"data.blend[{k}]: weight {data.blend[k][0]} is too small to be drawn "
                          f"(under 1/{PERIOD} of the total)")
    return blend


def make_sampler(dataset, global_batch_size: int, seed: int, shuffle: bool = True):
    """The global-batch sampler of a dataset: a blend's own, else epoch permutations of its indices."""
    if isinstance(dataset, BlendedDataset):
        return dataset.sampler(global_batch_size, seed, shuffle)
    return GlobalBatchSampler(len(dataset), global_batch_size, seed, shuffle=shuffle)
