"""Packed multimodal (image + chat) dataset, its microbatches and a resumable batch iterator.

A JSONL line is one sample::

    {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                  {"role": "assistant", "content": "red"}],
     "images": ["img/0001.png"], "question_type": "colour"}

Image paths are relative to the JSONL file's directory. This module's MultimodalDataset
(``from_jsonl``) reads every line, checks it, tokenizes it and decodes every image once, and
keeps the samples in memory; training reads the same data on demand instead
(LazyMultimodalDataset, engine/data/multimodal_lazy.py). Each bad sample is either a
``ValueError`` naming file and line (``train.jsonl:17: image img/0007.png is missing``) or,
with ``on_bad_sample="skip"``, dropped and counted by reason (``bad_sample_counts``). The
samples are then packed whole into ``seq_len`` sequences (engine/data/multimodal_packing.py),
and the text GlobalBatchSampler picks sequences, so a step's global batch is independent of
the layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from loom.data.chat import check_messages, count_image_tags, encode_chat
from loom.data.images import image_problem, image_token_count, make_image_loader
from loom.data.multimodal_packing import PackingPlan, pack_samples
from loom.data.packing import IGNORE_INDEX, Sample
from loom.data.sampler import Microbatch, collate, rank_slice
from loom.data.tokenizer import Tokenizer

# Why a sample is skipped (or, under data.on_bad_sample=error, refused), for every multimodal dataset.
BAD_SAMPLE_REASONS = ("malformed", "placeholder_mismatch", "too_long", "missing_image", "corrupt_image",
                      "missing_video", "corrupt_video")


@dataclass
class ChatSample:
    """One prepared sample.

    input_ids: int64 ``[L]`` with N placeholder ids per image; labels: int64 ``[L]`` (chat.py)
    images:    absolute image paths, in placeholder order
    """

    input_ids: np.ndarray
    labels: np.ndarray
    images: list[str]
    question_type: Optional[str]
    file: str
    line: int


@dataclass
class BadSample:
    file: str
    line: int
    reason: str  # one of BAD_SAMPLE_REASONS
    message: str  # "file:line: what is wrong"


class BadSampleError(ValueError):
    """A sample that cannot be used, under ``data.on_bad_sample=error``: the message starts ``file:line:``.

    A ValueError, as before it had a type of its own; entry points report it in one line (loom.cli)."""


class RejectedSample(Exception):
    """Raised while reading one sample: ``reason`` (one of BAD_SAMPLE_REASONS) and what is wrong with it.
    The dataset turns it into a BadSample record, or a BadSampleError under data.on_bad_sample=error."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class MultimodalSequence(Sample):
    """A packed sequence (numpy): the text ``Sample`` fields plus its images.

    doc_lens:    int32 ``[k]`` one per sample, plus one trailing padding document when the
                 samples do not fill ``seq_len`` (pad tokens never carry labels)
    image_paths: this sequence's images in placeholder order
    sample_ids:  int64 ``[num_samples_in_sequence]`` dataset sample indices, in order
    pixels:      float32 ``[num_images, 3, H, W]`` when the images were decoded with the sequence
                 (the lazy dataset), else None (``collate`` decodes ``image_paths``)
    """

    image_paths: list[str]
    sample_ids: np.ndarray
    pixels: Optional[np.ndarray] = None


# ----------------------------------------------------------------------------- preparation


def encode_line(raw: bytes, tok: Tokenizer, image_tokens: int) -> tuple:
    """The text-level checks and encoding of one JSONL line: (EncodedChat, relative image paths,
    question_type). Raises RejectedSample for a malformed line or a placeholder mismatch; the length and
    the images are checked by the callers (the length limit depends on ``seq_len``)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RejectedSample("malformed", f"not valid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise RejectedSample("malformed", f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RejectedSample("malformed", "a sample must be a JSON object")
    problem = check_messages(record.get("messages"))
    images = record.get("images", [])
    if problem is None and not (isinstance(images, list) and all(isinstance(p, str) for p in images)):
        problem = '"images" must be a list of paths'
    if problem:
        raise RejectedSample("malformed", problem)
    messages = record["messages"]
    tags = count_image_tags(messages)
    if tags != len(images):
        raise RejectedSample("placeholder_mismatch", f"{tags} <image> tags in the messages but {len(images)} images")
    return encode_chat(messages, tok, image_tokens), images, record.get("question_type")


def too_long(num_tokens: int, num_images: int, image_tokens: int, seq_len: int) -> Optional[RejectedSample]:
    if num_tokens <= seq_len:
        return None
    return RejectedSample("too_long", f"sample is {num_tokens} tokens ({num_images} images x {image_tokens} image "
                            f"tokens), longer than data.seq_len={seq_len}")


def _parse_line(raw: bytes, base_dir: str, tok: Tokenizer, seq_len: int, image_tokens: int) -> tuple:
    """Check and encode one JSONL line: (EncodedChat, image paths, question_type).

    Raises RejectedSample(reason, detail). Cheap checks run first; decoding the images runs last.
    """
    encoded, images, question_type = encode_line(raw, tok, image_tokens)
    bad = too_long(len(encoded.input_ids), len(images), image_tokens, seq_len)
    if bad:
        raise bad
    paths = [os.path.join(base_dir, p) for p in images]
    for rel, path in zip(images, paths):
        bad = image_problem(path)
        if bad:
            raise RejectedSample(bad[0], f"image {rel} {bad[1]}")
    return encoded, paths, question_type


def read_chat_jsonl(path: str, tok: Tokenizer, seq_len: int, image_tokens: int,
                    on_bad_sample: str = "error") -> tuple[list[ChatSample], list[BadSample]]:
    """Prepare every line of one JSONL file (blank lines are ignored).

    Returns (good samples, bad samples); with on_bad_sample="error" the first bad one raises
    ``ValueError("path:line: ...")`` instead.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r} must be error or skip")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    base_dir = os.path.dirname(os.path.abspath(path))
    good, bad = [], []
    with open(path, "rb") as f:  # bytes: a line of bad UTF-8 is one bad sample, not a crash
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                encoded, images, question_type = _parse_line(raw, base_dir, tok, seq_len, image_tokens)
            except RejectedSample as e:
                message = f"{path}:{line_no}: {e.detail}"
                if on_bad_sample == "error":
                    raise BadSampleError(message) from None
                bad.append(BadSample(path, line_no, e.reason, message))
                continue
            good.append(ChatSample(encoded.input_ids, encoded.labels, images, question_type, path, line_no))
    return good, bad


# ----------------------------------------------------------------------------- dataset


class MultimodalDataset:
    """Prepared chat samples packed into ``seq_len`` sequences; ``len`` = number of sequences.

    ``dataset[s]`` is a MultimodalSequence of exactly ``seq_len`` tokens, so microbatch shapes
    stay fixed (what sequence and context parallelism need). This class holds every prepared
    sample in memory (``samples``); LazyMultimodalDataset (engine/data/multimodal_lazy.py) reads
    them on demand through the same sequence, collate and microbatch code.
    """

    def __init__(self, samples: list[ChatSample], seq_len: int, tokenizer: Tokenizer, image_tokens: int,
                 image_loader: Callable[[Sequence[str]], torch.Tensor], seed: int,
                 pack_window: Optional[int] = None, bad_samples: Sequence[BadSample] = ()):
        self.samples = samples
        self._setup([len(s.input_ids) for s in samples], seq_len, tokenizer, image_tokens, image_loader, seed,
                    pack_window, bad_samples)

    def _setup(self, lengths, seq_len: int, tokenizer: Tokenizer, image_tokens: int, image_loader, seed: int,
               pack_window: Optional[int], bad_samples: Sequence[BadSample]) -> None:
        if not len(lengths):
            where = f" ({len(bad_samples)} bad samples skipped)" if bad_samples else ""
            raise ValueError(f"the multimodal dataset has no usable samples{where}")
        self.seq_len, self.num_samples = int(seq_len), len(lengths)
        self.pad_id, self.image_id, self.vocab_size = tokenizer.pad_id, tokenizer.image_id, tokenizer.vocab_size
        self.image_tokens, self.image_loader = int(image_tokens), image_loader
        self.bad_samples = list(bad_samples)
        self.plan: PackingPlan = pack_samples(lengths, seq_len, seed, pack_window)

    @classmethod
    def from_jsonl(cls, paths: str | Sequence[str], tokenizer: Tokenizer, seq_len: int, *, image_size: int,
                   patch_size: int, merge: bool, seed: int, on_bad_sample: str = "error",
                   pack_window: Optional[int] = None, image_backend: str = "pillow",
                   image_tokens: Optional[int] = None) -> "MultimodalDataset":
        """Read, check and pack one or more JSONL files (samples concatenated in file order).

        image_size/patch_size/merge come from the vision encoder config and fix N, the
        placeholder tokens per image (loom.data.images.image_token_count), unless the encoder
        says otherwise (``image_tokens``: VisionConfig.tokens_per_image, e.g. with a kept class token).
        """
        n_image = image_token_count(image_size, patch_size, merge) if image_tokens is None else int(image_tokens)
        samples, bad = [], []
        for path in jsonl_paths(paths):
            good_k, bad_k = read_chat_jsonl(path, tokenizer, seq_len, n_image, on_bad_sample)
            samples += good_k
            bad += bad_k
        loader = make_image_loader(image_size, image_backend)
        return cls(samples, seq_len, tokenizer, n_image, loader, seed, pack_window, bad)

    @classmethod
    def from_config(cls, data_cfg, split: str, *, image_size: int, patch_size: int, merge: bool,
                    seed: int, image_tokens: Optional[int] = None) -> "MultimodalDataset":
        """The ``train`` or ``eval`` split named by ``data.train_jsonl`` / ``data.eval_jsonl``."""
        path = getattr(data_cfg, f"{split}_jsonl")
        if path is None:
            raise ValueError(f"data.{split}_jsonl is not set")
        backend = data_cfg.image_backend
        if backend == "auto" and data_cfg.num_workers > 0:  # DALI decodes on the GPU: never in a worker
            backend = "pillow"
        return cls.from_jsonl(path, Tokenizer.load(data_cfg.tokenizer), data_cfg.seq_len, image_size=image_size,
                              patch_size=patch_size, merge=merge, seed=seed, on_bad_sample=data_cfg.on_bad_sample,
                              pack_window=data_cfg.pack_window, image_backend=backend,
                              image_tokens=image_tokens)

    def __len__(self) -> int:
        return self.plan.num_sequences

    @property
    def packing_efficiency(self) -> float:
        """Real tokens over slots (padding is the rest)."""
        return self.plan.efficiency

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Skipped samples by reason; every reason is present, zeros included."""
        counts = Counter(b.reason for b in self.bad_samples)
        return {reason: counts.get(reason, 0) for reason in BAD_SAMPLE_REASONS}

    def metrics(self) -> dict[str, float]:
        """Flat figures for metrics.jsonl: packing efficiency and skipped samples per reason."""
        out: dict[str, float] = {"data/packing_efficiency": self.packing_efficiency,
                                 "data/samples": self.num_samples, "data/sequences": len(self)}
        out.update({f"data/skipped_{r}": n for r, n in self.bad_sample_counts.items()})
        return out

    def sample(self, i: int) -> ChatSample:
        """Prepared sample ``i`` (in file order over the good samples)."""
        return self.samples[i]

    def __getitem__(self, s: int) -> MultimodalSequence:
        ids = self._sequence_ids(s)
        return self._assemble(ids, [self.sample(int(i)) for i in ids])

    def _sequence_ids(self, s: int) -> np.ndarray:
        n = len(self)
        if not -n <= s < n:
            raise IndexError(f"{type(self).__name__} index {s} out of range for {n} sequences")
        return self.plan.sequence(int(s) % n)

    def _assemble(self, ids: np.ndarray, docs: Sequence[ChatSample], pixels: Optional[np.ndarray] = None
                  ) -> MultimodalSequence:
        lens = [len(d.input_ids) for d in docs]
        pad = self.seq_len - sum(lens)
        doc_lens = lens + ([pad] if pad else [])
        input_ids = np.concatenate([d.input_ids for d in docs] + [np.full(pad, self.pad_id, np.int64)])
        labels = np.concatenate([d.labels for d in docs] + [np.full(pad, IGNORE_INDEX, np.int64)])
        positions = np.concatenate([np.arange(k, dtype=np.int32) for k in doc_lens])
        return MultimodalSequence(input_ids=input_ids, labels=labels, positions=positions,
                                  doc_lens=np.asarray(doc_lens, np.int32),
                                  image_paths=[p for d in docs for p in d.images], sample_ids=ids.copy(),
                                  pixels=pixels)

    def collate(self, sequences: Sequence[MultimodalSequence]) -> Microbatch:
        """Text fields as ``sampler.collate``, plus (images in placeholder order)

        pixel_values:       float32 ``[num_images, 3, H, W]``
        image_token_counts: int64 ``[num_images]``, placeholder tokens of each image
        """
        mb = collate(sequences)
        paths = [p for s in sequences for p in s.image_paths]
        if all(s.pixels is not None for s in sequences):  # decoded already, where the sequence was read
            pixel_values = torch.from_numpy(np.concatenate([s.pixels for s in sequences]))
        else:
            pixel_values = self.image_loader(paths)
        return dataclasses.replace(mb, pixel_values=pixel_values,
                                   image_token_counts=torch.full((len(paths),), self.image_tokens, dtype=torch.int64))

    def microbatches(self, global_indices: Sequence[int], dp_rank: int, dp_size: int,
                     micro_batch_size: int) -> list[Microbatch]:
        """This DP rank's microbatches of a global batch; same slicing as ``rank_microbatches``."""
        mine = rank_slice(global_indices, dp_rank, dp_size, micro_batch_size)
        return [self.collate([self[int(i)] for i in mine[k:k + micro_batch_size]])
                for k in range(0, len(mine), micro_batch_size)]


def jsonl_paths(paths: str | os.PathLike | Sequence[str]) -> list[str]:
    return [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
