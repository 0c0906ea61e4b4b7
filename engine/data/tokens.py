"""Token corpora: an in-memory or memory-mapped token stream split into documents.

On disk a corpus is two ``.npy`` files side by side:

- ``X.npy``      token ids, int32 ``[num_tokens]``;
- ``X.idx.npy``  document offsets, int64 ``[num_docs + 1]``; document ``d`` is
  ``tokens[offsets[d]:offsets[d + 1]]``.

Both are plain ``.npy`` so they can be memory-mapped (``np.load(mmap_mode="r")``)
and shared by every rank through the page cache.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Sequence

import numpy as np

from loom.config import ConfigError
from loom.config import token_index_path as index_path  # the rule lives with data.source's validation

TOKEN_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_INT32_MAX = np.iinfo(np.int32).max


def _tokens_problem(tokens: np.ndarray, check_values: bool = True) -> str | None:
    """Return what is wrong with a token array, or None."""
    if tokens.ndim != 1:
        return f"tokens must be 1-D, got shape {tokens.shape}"
    if tokens.dtype not in TOKEN_DTYPES:
        return f"tokens must be int32 or int64, got {tokens.dtype}"
    # One streaming pass; on a memmap it reads through the page cache, not into RAM.
    if check_values and tokens.size and int(tokens.min()) < 0:
        return f"token ids must be >= 0, found {int(tokens.min())}"
    return None


def _offsets_problem(offsets: np.ndarray, num_tokens: int) -> str | None:
    """Return what is wrong with doc offsets for a stream of num_tokens tokens, or None."""
    if offsets.ndim != 1:
        return f"doc_offsets must be 1-D, got shape {offsets.shape}"
    if offsets.dtype != np.int64:
        return f"doc_offsets must be int64, got {offsets.dtype}"
    if offsets.size == 0:
        return "doc_offsets must hold at least one entry ([0] for an empty corpus)"
    if offsets[0] != 0:
        return f"doc_offsets must start at 0, got {int(offsets[0])}"
    if offsets[-1] != num_tokens:
        return f"doc_offsets end at {int(offsets[-1])} but there are {num_tokens} tokens"
    if offsets.size > 1 and bool((np.diff(offsets) < 0).any()):
        bad = int(np.flatnonzero(np.diff(offsets) < 0)[0])
        return (f"doc_offsets must be non-decreasing, offsets[{bad}]={int(offsets[bad])} > "
                f"offsets[{bad + 1}]={int(offsets[bad + 1])}")
    return None


class TokenCorpus:
    """A token stream with document boundaries.

    tokens:      int32 or int64 ``[num_tokens]`` (may be a read-only np.memmap)
    doc_offsets: int64 ``[num_docs + 1]``, 0 .. num_tokens, non-decreasing
                 (empty documents are allowed)
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, *, validate: bool = True):
        tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
        doc_offsets = np.asarray(doc_offsets)
        # Accept any integer offsets (e.g. from Python lists) but store the contract dtype.
        if doc_offsets.dtype.kind in "iu" and doc_offsets.dtype != np.int64:
            doc_offsets = doc_offsets.astype(np.int64)
        if validate:
            problem = _tokens_problem(tokens) or _offsets_problem(doc_offsets, len(tokens))
            if problem:
                raise ValueError(f"TokenCorpus: {problem}")
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self._file = file_backing(tokens)
        self._fd: int | None = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a descriptor means nothing in another process

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def window(self, start: int, end: int) -> np.ndarray:
        """``tokens[start:end]`` in memory. Tokens memory-mapped from a file are read with pread, not
        through the mapping: every page touched through it stays in this process's resident set (a
        whole large folio per touch on recent kernels), so a long run would look as if it held the
        corpus in memory. Both ways read the same shared page cache."""
        end = min(end, self.num_tokens)
        if self._file is None or end <= start:
            return np.asarray(self.tokens[start:end])
        path, offset = self._file
        if self._fd is None:
            self._fd = os.open(path, os.O_RDONLY)
        size = self.tokens.dtype.itemsize
        data = os.pread(self._fd, (end - start) * size, offset + start * size)
        return np.frombuffer(data, dtype=self.tokens.dtype)

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    def doc(self, d: int) -> np.ndarray:
        """Tokens of document d: ``[len_d]``."""
        return self.tokens[self.doc_offsets[d] : self.doc_offsets[d + 1]]

    def __repr__(self) -> str:
        return f"TokenCorpus(num_tokens={self.num_tokens}, num_docs={self.num_docs}, dtype={self.tokens.dtype})"


# ---------------------------------------------------------------------------
# Synthetic data


_STRIDES = np.array([1, 2, 3, 5, 7], dtype=np.int64)
_MAX_MOTIF = 8


def _doc_lengths(rng: np.random.Generator, num_tokens: int, lo: int, hi: int) -> np.ndarray:
    """Random lengths in [lo, hi] summing to exactly num_tokens; the last one is truncated."""
    chunks, total = [], 0
    while total < num_tokens:
        n = (num_tokens - total) // ((lo + hi) // 2) + 16
        chunk = rng.integers(lo, hi + 1, size=n, dtype=np.int64)
        chunks.append(chunk)
        total += int(chunk.sum())
    lengths = np.concatenate(chunks)
    ends = np.cumsum(lengths)
    keep = int(np.searchsorted(ends, num_tokens, side="left")) + 1
    lengths = lengths[:keep]
    lengths[-1] -= int(ends[keep - 1]) - num_tokens
    return lengths


def synthetic_corpus(
    vocab_size: int, num_tokens: int, seed: int, min_doc_len: int = 8, max_doc_len: int = 96
) -> TokenCorpus:
    """A deterministic, learnable corpus of ``num_tokens`` int32 tokens in [0, vocab_size).

    Each document is, at random, either
      - an arithmetic progression ``(start + stride * j) % vocab_size``, stride in {1,2,3,5,7}, or
      - a short random motif (period 2..8) repeated,
    so the next token is predictable from the last few: a tiny LM's loss falls fast.
    Document lengths are uniform in [min_doc_len, max_doc_len], except the last one, which is
    truncated so the corpus holds exactly ``num_tokens`` tokens.
    """
    if vocab_size < 1 or vocab_size > _INT32_MAX:
        raise ValueError(f"synthetic_corpus: vocab_size={vocab_size} must be in [1, 2**31)")
    if num_tokens < 1:
        raise ValueError(f"synthetic_corpus: num_tokens={num_tokens} must be >= 1")
    if not 1 <= min_doc_len <= max_doc_len:
        raise ValueError(f"synthetic_corpus: need 1 <= min_doc_len={min_doc_len} <= max_doc_len={max_doc_len}")
    rng = np.random.default_rng(seed)
    lengths = _doc_lengths(rng, num_tokens, min_doc_len, max_doc_len)
    n = len(lengths)
    is_motif = rng.random(n) < 0.5
    start = rng.integers(0, vocab_size, size=n, dtype=np.int64)
    stride = rng.choice(_STRIDES, size=n)
    period = rng.integers(2, _MAX_MOTIF + 1, size=n, dtype=np.int64)
    motif = rng.integers(0, vocab_size, size=(n, _MAX_MOTIF), dtype=np.int64)

    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    doc = np.repeat(np.arange(n), lengths)  # [num_tokens] document of each token
    j = np.arange(num_tokens, dtype=np.int64) - offsets[doc]  # position inside the document
    progression = (start[doc] + stride[doc] * j) % vocab_size
    repeated = motif[doc, j % period[doc]]
    tokens = np.where(is_motif[doc], repeated, progression).astype(np.int32)
    return TokenCorpus(tokens, offsets)


# ---------------------------------------------------------------------------
# Files


def _atomic_save(path: str, array: np.ndarray) -> None:
    """np.save to a temp file in the same directory, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_token_file(path: str | os.PathLike, docs: Sequence) -> None:
    """Write documents to ``path`` (``X.npy``, int32 tokens) and ``X.idx.npy`` (int64 offsets).

    docs: a list of 1-D array-likes of non-negative token ids < 2**31.
    Each file is replaced atomically; the index is written last, so a reader racing a
    rewrite sees a consistent pair or an offsets/token-count mismatch error, never a torn file.
    """
    path = os.fspath(path)
    idx_path = index_path(path)
    arrays = [np.asarray(d).reshape(-1) for d in docs]
    for k, a in enumerate(arrays):
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"write_token_file({path}): document {k} has non-integer dtype {a.dtype}")
        if a.size and (int(a.min()) < 0 or int(a.max()) > _INT32_MAX):
            raise ValueError(f"write_token_file({path}): document {k} has token ids outside [0, 2**31)")
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    _atomic_save(path, tokens)
    _atomic_save(idx_path, offsets)


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, "rb") as f:  # numpy reads a file without its header as a pickle, and says so
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path}: not a .npy array (no NumPy header); write {what}s with write_token_file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read as a .npy array ({e})") from e


def file_backing(tokens: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of ``tokens[0]``) of an np.memmap made directly over a file, else None."""
    if isinstance(tokens, np.memmap) and isinstance(tokens.base, mmap.mmap) and tokens.filename:
        return tokens.filename, int(tokens.offset)
    return None


def _token_chunks(tokens: np.ndarray, chunk: int):
    """``(start, tokens[start:start + chunk])`` over the whole array; a memory-mapped file is read
    through the file, as ``TokenCorpus.window`` does, so a scan leaves nothing resident."""
    backing = file_backing(tokens)
    if backing is None:
        for start in range(0, len(tokens), chunk):
            yield start, np.asarray(tokens[start:start + chunk])
        return
    with open(backing[0], "rb") as f:
        f.seek(backing[1])
        for start in range(0, len(tokens), chunk):
            part = np.fromfile(f, dtype=tokens.dtype, count=min(chunk, len(tokens) - start))
            yield start, part


def check_vocab(corpus: TokenCorpus, vocab_size: int, where: str, chunk: int = 1 << 22) -> None:
    """Raise ConfigError if a token id is >= ``vocab_size`` (or negative): the embedding lookup would
    fail with an IndexError on CPU and a device-side assert on CUDA, far from the file that caused it.
    Reads the tokens in chunks, so a large corpus costs one pass, not its size in RAM; a dtype whose
    every value is a valid id (uint16 under a vocabulary of 65536 or more) needs no pass at all."""
    tokens = corpus.tokens
    if tokens.dtype.kind == "u" and np.iinfo(tokens.dtype).max < vocab_size:
        return
    for start, part in _token_chunks(tokens, chunk):
        top = int(part.max())
        low = int(part.min()) if tokens.dtype.kind == "i" else 0
        if top >= vocab_size or low < 0:
            at = start + int(np.argmax((part >= vocab_size) | (part < 0)))
            raise ConfigError(f"{where}: token id {int(tokens[at])} at position {at} is outside "
                              f"model.vocab_size={vocab_size} (largest id in this chunk: {top})")


def load_token_file(path: str | os.PathLike) -> TokenCorpus:
    """Memory-map ``X.npy`` and ``X.idx.npy`` into a TokenCorpus, checking both.

    Raises FileNotFoundError for a missing file and ValueError for bad contents;
    every message names the offending file.
    """
    path = os.fspath(path)
    idx_path = index_path(path)
    tokens = _load_npy(path, "token file")
    offsets = _load_npy(idx_path, "document index file")
    problem = _tokens_problem(tokens)
    if problem:
        raise ValueError(f"{path}: {problem}")
    problem = _offsets_problem(offsets, len(tokens))
    if problem:
        raise ValueError(f"{idx_path}: {problem} (token file {path})")
    return TokenCorpus(tokens, offsets, validate=False)
