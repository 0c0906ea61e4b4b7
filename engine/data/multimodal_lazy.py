"""The multimodal dataset without the dataset in memory: samples are read when a sequence needs them.

Before training, each JSONL file's byte-offset index (engine/data/jsonl_index.py, cached beside
the file) gives every line's token count and its text-level problems, so packing and the
``data.on_bad_sample`` checks run exactly as for the eager MultimodalDataset, and the plan is
the same for the same samples. ``dataset[s]`` then seeks to the lines of sequence ``s``, encodes
them and decodes their images (with the Pillow loader), nothing else. What stays in memory is
about 20 bytes per sample: where its line is, its length, and the packing plan.

A corrupt image (or one deleted since the index was built) can only be found when it is
decoded. ``error`` raises ``ValueError("file:line: image ... cannot be decoded ...")``.
``skip`` counts it in ``bad_samples`` and keeps the sample's slot in its sequence as padding:
pad ids, no labels, no image, positions and document length unchanged. The sequence layout
never depends on which images decode, so every rank and every worker builds the same batch
for a step, and the shapes stay fixed.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from loom.data.images import ImageProcessor, image_problem, image_token_count, make_image_loader
from loom.data.jsonl_index import cache_path, index_files, read_line
from loom.data.multimodal import (BadSample, BadSampleError, ChatSample, MultimodalDataset, MultimodalSequence, RejectedSample,
                                    encode_line)
from loom.data.packing import IGNORE_INDEX
from loom.data.tokenizer import Tokenizer


class LazyMultimodalDataset(MultimodalDataset):
    """MultimodalDataset over JSONL files read on demand.

    files:    the JSONL paths; file_ids, offsets, lines, lengths: ``[num_samples]`` arrays
              (int32, int64, int32, int32) locating and sizing each usable sample, in file order
    """

    def __init__(self, files: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray, lines: np.ndarray,
                 lengths: np.ndarray, seq_len: int, tokenizer: Tokenizer, image_tokens: int, image_loader,
                 seed: int, pack_window: Optional[int] = None, bad_samples: Sequence[BadSample] = (),
                 on_bad_sample: str = "error"):
        self.files, self.file_ids, self.offsets, self.lines, self.lengths = (
            list(files), file_ids, offsets, lines, lengths)
        self.tokenizer, self.on_bad_sample = tokenizer, on_bad_sample
        self._setup(lengths, seq_len, tokenizer, image_tokens, image_loader, seed, pack_window, bad_samples)
        self._known_bad = {(b.file, b.line) for b in self.bad_samples}

    @classmethod
    def from_jsonl(cls, paths, tokenizer: Tokenizer, seq_len: int, *, image_size: int, patch_size: int,
                   merge: bool, seed: int, on_bad_sample: str = "error", pack_window: Optional[int] = None,
                   image_backend: str = "pillow", image_tokens: Optional[int] = None) -> "LazyMultimodalDataset":
        """As ``MultimodalDataset.from_jsonl``, from the files' indexes; text-level bad samples raise
        (``error``) or are counted (``skip``) here, before training."""
        n_image = image_token_count(image_size, patch_size, merge) if image_tokens is None else int(image_tokens)
        files, columns, bad = index_files(paths, tokenizer, seq_len, n_image, on_bad_sample)
        return cls(files, *columns, seq_len, tokenizer, n_image, make_image_loader(image_size, image_backend),
                   seed, pack_window, bad, on_bad_sample)

    def sample(self, i: int) -> ChatSample:
        """Sample ``i``, read from its line and encoded again."""
        path, line = self.files[self.file_ids[i]], int(self.lines[i])
        try:
            encoded, images, question_type = encode_line(read_line(path, self.offsets[i]), self.tokenizer,
                                                         self.image_tokens)
        except RejectedSample:
            encoded = None
        if encoded is None or len(encoded.input_ids) != self.lengths[i]:
            raise BadSampleError(f"{path}:{line}: the line changed after its index {cache_path(path)} was built; "
                             "restart to rebuild it")
        base_dir = os.path.dirname(os.path.abspath(path))
        return ChatSample(encoded.input_ids, encoded.labels, [os.path.join(base_dir, p) for p in images],
                          question_type, path, line)

    def __getitem__(self, s: int) -> MultimodalSequence:
        ids = self._sequence_ids(s)
        docs = [self.sample(int(i)) for i in ids]
        if not isinstance(self.image_loader, ImageProcessor):  # a GPU loader decodes in collate
            return self._assemble(ids, docs)
        pixels = []
        for k, doc in enumerate(docs):
            try:
                pixels += self._decode(doc)
            except RejectedSample as e:
                docs[k] = self._drop(doc, e)
        size = self.image_loader.image_size
        rgb = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
        return self._assemble(ids, docs, self.image_loader.normalize(rgb))

    def _decode(self, doc: ChatSample) -> list[np.ndarray]:
        """``doc``'s images, decoded and resized (uint8 ``[H, W, 3]`` each); normalised by the caller."""
        out = []
        for path in doc.images:
            try:
                out.append(self.image_loader.decode(path))
            except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
                reason, detail = image_problem(path) or ("corrupt_image", f"cannot be decoded ({e})")
                rel = os.path.relpath(path, os.path.dirname(os.path.abspath(doc.file)))
                raise RejectedSample(reason, f"image {rel} {detail}") from None
        return out

    def _drop(self, doc: ChatSample, problem: RejectedSample) -> ChatSample:
        """``doc`` as padding (``skip``), or the error naming its file and line (``error``)."""
        message = f"{doc.file}:{doc.line}: {problem.detail}"
        if self.on_bad_sample == "error":
            raise BadSampleError(message)
        self.record_bad([BadSample(doc.file, doc.line, problem.reason, message)])
        n = len(doc.input_ids)
        return ChatSample(np.full(n, self.pad_id, np.int64), np.full(n, IGNORE_INDEX, np.int64), [],
                          doc.question_type, doc.file, doc.line)

    def record_bad(self, found: Sequence[BadSample]) -> None:
        """Add bad samples found while reading (here or in a loader worker), each once."""
        for bad in found:
            if (bad.file, bad.line) not in self._known_bad:
                self._known_bad.add((bad.file, bad.line))
                self.bad_samples.append(bad)
