"""Megatron's indexed dataset format: ``PREFIX.bin`` holds the tokens, ``PREFIX.idx`` says where.

``PREFIX.idx``, little-endian, as megatron.core.datasets.indexed_dataset writes and reads it:

    magic              9 bytes       b"MMIDIDX\\x00\\x00"
    version            uint64        1
    dtype code         uint8         of the tokens: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
                                     (6 float64 and 7 float32 exist in the format; token ids are integers)
    sequence count     uint64        S
    document count     uint64        D + 1: the length of the document index array, one more than
                                     the number of documents
    sequence lengths   int32 [S]     tokens per sequence
    sequence pointers  int64 [S]     byte offset of each sequence in .bin
    document indices   int64 [D+1]   document d is sequences [doc[d], doc[d+1]); 0 first, S last
    sequence modes     int8  [S]     only in multimodal files

``PREFIX.bin`` is the sequences' tokens back to back, nothing else.

Loom's document is Megatron's document. Files written one document at a time hold one sequence per
document; a document written as several sequences (Megatron's ``add_document`` with several
lengths, or ``add_item`` calls closed by one ``end_document``) reads back as one document spanning
them. The reader memory-maps both files: nothing proportional to the number of tokens is read into
memory, only arrays over sequences and documents.
"""
from __future__ import annotations

import os
import struct
import tempfile
from array import array
from typing import Optional, Sequence

import numpy as np

from loom.config import indexed_paths
from loom.data.tokens import TokenCorpus

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def best_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice of token dtype: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def indexed_exists(prefix: str | os.PathLike) -> bool:
    return all(os.path.isfile(p) for p in indexed_paths(os.fspath(prefix)))


def _mapped(path: str, dtype, what: str) -> np.ndarray:
    # np.memmap refuses an empty file, which is a valid empty corpus.
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r")
    except ValueError as e:
        raise ValueError(f"{what} {path}: cannot be mapped as {np.dtype(dtype)} ({e})") from None


class IndexedReader:
    """A memory-mapped ``PREFIX.bin`` / ``PREFIX.idx`` pair.

    dtype:             the token dtype the index names
    sequence_lengths:  int32 ``[S]``, a view of the mapped index
    sequence_pointers: int64 ``[S]`` byte offsets into .bin
    document_indices:  int64 ``[D + 1]``
    modes:             int8 ``[S]`` for multimodal files, else None
    tokens:            ``[num_tokens]`` of dtype, the mapped .bin
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = indexed_paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset {self.prefix}: {path} not found")
        self._read_index()
        self.tokens = _mapped(self.bin_path, self.dtype, "token file")
        end = 0
        if len(self):
            end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if end > os.path.getsize(self.bin_path):
            raise ValueError(f"{self.bin_path}: holds {os.path.getsize(self.bin_path)} bytes but {self.idx_path} "
                             f"places its last sequence up to byte {end} (a truncated .bin?)")

    def _read_index(self) -> None:
        path = self.idx_path
        index = _mapped(path, np.uint8, "index file")
        if len(index) < HEADER_BYTES:
            raise ValueError(f"{path}: {len(index)} bytes, shorter than the {HEADER_BYTES}-byte header")
        header = bytes(index[:HEADER_BYTES])
        if header[:len(MAGIC)] != MAGIC:
            raise ValueError(f"{path}: not a Megatron indexed dataset index (magic {header[:len(MAGIC)]!r})")
        version, code, num_seqs, num_doc_idx = struct.unpack("<QBQQ", header[len(MAGIC):])
        if version != VERSION:
            raise ValueError(f"{path}: index version {version}, only version {VERSION} exists")
        if code not in DTYPES or np.dtype(DTYPES[code]).kind == "f":
            raise ValueError(f"{path}: dtype code {code} is not an integer token dtype "
                             f"(known: {', '.join(f'{c} {np.dtype(t)}' for c, t in DTYPES.items())})")
        self.dtype = np.dtype(DTYPES[code])
        arrays = HEADER_BYTES + 12 * num_seqs + 8 * num_doc_idx
        extra = len(index) - arrays
        if extra not in (0, num_seqs):
            raise ValueError(f"{path}: {len(index)} bytes, but {num_seqs} sequences and {num_doc_idx} document "
                             f"indices take {arrays} (or {arrays + num_seqs} with sequence modes)")
        at = HEADER_BYTES
        self.sequence_lengths = index[at:at + 4 * num_seqs].view(np.int32)
        at += 4 * num_seqs
        self.sequence_pointers = index[at:at + 8 * num_seqs].view(np.int64)
        at += 8 * num_seqs
        self.document_indices = index[at:at + 8 * num_doc_idx].view(np.int64)
        at += 8 * num_doc_idx
        self.modes = index[at:].view(np.int8) if extra and num_seqs else None
        docs = self.document_indices
        if num_doc_idx < 1 or docs[0] != 0 or docs[-1] != num_seqs:
            first, last = (int(docs[0]), int(docs[-1])) if num_doc_idx else (None, None)
            raise ValueError(f"{path}: document indices must run from 0 to the sequence count {num_seqs}, "
                             f"they run from {first} to {last}")
        if num_doc_idx > 1 and bool((np.diff(docs) < 0).any()):
            bad = int(np.flatnonzero(np.diff(docs) < 0)[0])
            raise ValueError(f"{path}: document indices decrease at document {bad}")
        if num_seqs and int(self.sequence_lengths.min()) < 0:
            raise ValueError(f"{path}: a sequence length is negative")

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def sequence(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i``, a view of the mapped .bin."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def document(self, d: int) -> np.ndarray:
        """Tokens of document ``d``: its sequences in order."""
        first, last = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = [self.sequence(i) for i in range(first, last)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def corpus(self) -> TokenCorpus:
        """The file as one token stream with document boundaries (no copy of the tokens).

        Loom packs the stream, so the sequences must lie back to back in file order, as every
        writer of the format stores them."""
        lengths = self.sequence_lengths
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        misplaced = np.flatnonzero(self.sequence_pointers != starts[:-1] * self.dtype.itemsize)
        if len(misplaced):
            k = int(misplaced[0])
            raise ValueError(f"{self.idx_path}: sequence {k} starts at byte {int(self.sequence_pointers[k])} of "
                             f"{self.bin_path}, not right after the one before it (byte "
                             f"{int(starts[k]) * self.dtype.itemsize}); Loom reads the sequences as one stream")
        num_tokens = int(starts[-1])
        if num_tokens != len(self.tokens):
            raise ValueError(f"{self.bin_path}: holds {len(self.tokens)} tokens of {self.dtype}, "
                             f"{self.idx_path} describes {num_tokens}")
        return TokenCorpus(self.tokens, starts[self.document_indices], validate=False)

    def __repr__(self) -> str:
        return (f"IndexedReader({self.prefix}, {len(self)} sequences, {self.num_documents} documents, "
                f"{len(self.tokens)} tokens of {self.dtype})")


class IndexedWriter:
    """Stream documents into ``PREFIX.bin`` / ``PREFIX.idx``.

        with IndexedWriter(prefix, best_dtype(vocab_size)) as writer:
            for doc in docs:
                writer.add_document(doc)

    Both files are written under temporary names in the output directory and renamed into place by
    ``finalize`` (a clean exit from the ``with`` block), the index last: an interrupted or failed run
    leaves no file under the final names (and an older pair there untouched), and a reader never sees
    a new .bin beside a stale index. Memory holds one int32 length per sequence and one int64 per
    document, never the tokens.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES or self.dtype.kind == "f":
            raise ValueError(f"IndexedWriter: dtype {self.dtype} is not an integer dtype of the format "
                             f"({', '.join(str(np.dtype(t)) for t in DTYPES.values() if np.dtype(t).kind != 'f')})")
        self.prefix = os.fspath(prefix)
        self.bin_path, self.idx_path = indexed_paths(self.prefix)
        self._limits = np.iinfo(self.dtype)
        self._lengths = array("i")
        self._documents = array("q", [0])
        self._idx_tmp: Optional[str] = None
        self._bin_tmp = self._temp(self.bin_path)
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 20)
        self.num_tokens = 0

    @staticmethod
    def _temp(final: str) -> str:
        fd, path = tempfile.mkstemp(prefix=os.path.basename(final) + ".", suffix=".tmp",
                                    dir=os.path.dirname(os.path.abspath(final)))
        os.close(fd)
        return path

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    def _check(self, tokens: np.ndarray, where: str) -> np.ndarray:
        if tokens.size and tokens.dtype.kind not in "iu":
            raise ValueError(f"IndexedWriter({self.prefix}): {where} has non-integer dtype {tokens.dtype}")
        if tokens.size and (int(tokens.min()) < max(self._limits.min, 0) or int(tokens.max()) > self._limits.max):
            raise ValueError(f"IndexedWriter({self.prefix}): {where} has token ids outside [0, {self._limits.max}] "
                             f"of {self.dtype}")
        return tokens.astype(self.dtype, copy=False)

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """One document; ``lengths`` splits it into several sequences (default: one)."""
        tokens = self._check(np.asarray(tokens).reshape(-1), f"document {len(self._documents) - 1}")
        lengths = [tokens.size] if lengths is None else [int(n) for n in lengths]
        if any(n < 0 for n in lengths) or sum(lengths) != tokens.size:
            raise ValueError(f"IndexedWriter({self.prefix}): sequence lengths {lengths} of document "
                             f"{len(self._documents) - 1} must be >= 0 and sum to its {tokens.size} tokens")
        self._bin.write(tokens.tobytes())
        self._lengths.extend(lengths)
        self._documents.append(len(self._lengths))
        self.num_tokens += tokens.size

    def add_documents(self, tokens, lengths) -> None:
        """Many one-sequence documents at once: ``tokens`` back to back, ``lengths`` tokens each."""
        tokens = self._check(np.asarray(tokens).reshape(-1), f"documents from {len(self._documents) - 1}")
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if (lengths < 0).any() or int(lengths.sum()) != tokens.size:
            raise ValueError(f"IndexedWriter({self.prefix}): document lengths must be >= 0 and sum to the "
                             f"{tokens.size} tokens given, they sum to {int(lengths.sum())}")
        self._bin.write(tokens.tobytes())
        first = len(self._lengths)
        self._lengths.frombytes(lengths.astype(np.int32).tobytes())
        self._documents.frombytes(np.arange(first + 1, first + len(lengths) + 1, dtype=np.int64).tobytes())
        self.num_tokens += tokens.size

    @property
    def num_documents(self) -> int:
        return len(self._documents) - 1

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1], out=pointers[1:])
            pointers *= self.dtype.itemsize
            self._idx_tmp = self._temp(self.idx_path)
            with open(self._idx_tmp, "wb") as f:
                f.write(MAGIC)
                f.write(struct.pack("<QBQQ", VERSION, CODES[self.dtype], len(lengths), len(self._documents)))
                f.write(lengths.tobytes())
                f.write(pointers.tobytes())
                f.write(np.frombuffer(self._documents, dtype=np.int64).tobytes())
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(self.idx_path):  # an old index must not describe the new .bin
                os.remove(self.idx_path)
            os.replace(self._bin_tmp, self.bin_path)
            self._bin_tmp = self.bin_path  # from here on, a failure removes the new .bin too
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary files; nothing appears under the final names."""
        self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if path is not None and os.path.exists(path):
                os.remove(path)


def write_indexed(prefix: str | os.PathLike, docs, dtype=np.int32) -> None:
    """Write documents (1-D integer arrays, or ``(tokens, lengths)`` for multi-sequence ones) in one go."""
    with IndexedWriter(prefix, dtype) as writer:
        for doc in docs:
            if isinstance(doc, tuple):
                writer.add_document(*doc)
            else:
                writer.add_document(doc)
