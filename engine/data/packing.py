"""Packing: cut the concatenated document stream into fixed-length windows.

Sample ``i`` is tokens ``[i*seq_len, (i+1)*seq_len)`` of the stream. Nothing is padded
or dropped inside the stream; only the tail shorter than ``seq_len`` is unused. A document
that crosses a window border is split: each fragment is its own attention document
(positions restart at 0), but the label of the window's last token is still its true
next token, so no training signal is lost at the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loom.data.tokens import TokenCorpus

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One packed window (numpy arrays; ``collate`` turns them into torch).

    input_ids: int64 ``[seq_len]``
    labels:    int64 ``[seq_len]`` next token of the same document, IGNORE_INDEX at document ends
    positions: int32 ``[seq_len]`` position in the document fragment, 0 at each fragment start
    doc_lens:  int32 ``[n_docs_in_window]`` fragment lengths, summing to seq_len
    """

    input_ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    doc_lens: np.ndarray


class PackedDataset:
    """Fixed-length windows over a TokenCorpus; ``len`` is the number of full windows."""

    def __init__(self, corpus: TokenCorpus, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"PackedDataset: seq_len={seq_len} must be >= 1")
        self.corpus = corpus
        self.seq_len = int(seq_len)

    def __len__(self) -> int:
        return self.corpus.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"PackedDataset index {i} out of range for {n} samples")
        i = int(i) % n
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        offsets = self.corpus.doc_offsets
        # Document starts strictly inside the window; unique() folds empty documents away.
        inner = np.unique(offsets[np.searchsorted(offsets, start, "right") : np.searchsorted(offsets, end, "left")])
        frag_starts = np.concatenate(([start], inner)) - start  # [n_frag] local
        doc_lens = np.diff(np.concatenate((frag_starts, [self.seq_len])))
        # One token past the window gives the last label; at the stream end `end` is a doc border.
        window = np.asarray(self.corpus.window(start, end + 1), dtype=np.int64)
        labels = np.empty(self.seq_len, dtype=np.int64)
        labels[: len(window) - 1] = window[1:]
        labels[inner - start - 1] = IGNORE_INDEX
        if _contains(offsets, end):
            labels[-1] = IGNORE_INDEX
        positions = np.arange(self.seq_len) - np.repeat(frag_starts, doc_lens)
        return Sample(
            input_ids=window[: self.seq_len].copy(),
            labels=labels,
            positions=positions.astype(np.int32),
            doc_lens=doc_lens.astype(np.int32),
        )


def _contains(sorted_array: np.ndarray, value: int) -> bool:
    k = int(np.searchsorted(sorted_array, value, "left"))
    return k < len(sorted_array) and int(sorted_array[k]) == value
