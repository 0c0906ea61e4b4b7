"""Packed chat samples with images of any size and videos, for a native-resolution tower (Qwen2.5-VL).

A JSONL line is one sample, media paths relative to the file's directory::

    {"messages": [{"role": "user", "content": "<video>Which way does the shape move?"},
                  {"role": "assistant", "content": "left"}],
     "video": "frames/0001", "fps": 8}

``"image"`` / ``"video"`` name one item, ``"images"`` / ``"videos"`` a list; the k-th ``<image>``
(``<video>``) tag takes the k-th image (video). ``"fps"``: the frames' rate (default
``data.video_source_fps``). Sizes, frame sampling and patches: engine/data/media.py. Each item's
placeholder count is known when the file is indexed (its sizes and frames are probed there), so
packing stays a pure function of the sample lengths (engine/data/multimodal_packing.py), and
images and videos pack with text.
A microbatch carries transformers' inputs: ``pixel_values`` + ``image_grid_thw``,
``pixel_values_videos`` + ``video_grid_thw`` + ``second_per_grid_ts``; the model derives the
M-RoPE positions from them (VisionLanguageModel.rope_positions).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from loom.data.chat import check_messages, count_image_tags, count_video_tags, encode_chat_media
from loom.data.media import MediaItem, MediaOptions, media_patches, probe_image, probe_video
from loom.data.jsonl_index import OK, STATUS, cache_path, index_files, read_line
from loom.data.multimodal import BAD_SAMPLE_REASONS, BadSample, BadSampleError, ChatSample, MultimodalSequence, RejectedSample
from loom.data.multimodal_lazy import LazyMultimodalDataset
from loom.data.sampler import Microbatch, collate
from loom.data.tokenizer import Tokenizer



@dataclass
class NativeChatSample(ChatSample):
    """A ChatSample whose ``media`` (images and videos, each in tag order) are resolved to sizes and frames."""

    media: list = dataclasses.field(default_factory=list)


@dataclass
class NativeSequence(MultimodalSequence):
    media: list = dataclasses.field(default_factory=list)  # media_arrays of each sample, in sample order


def media_options(vision, data) -> MediaOptions:
    """MediaOptions from ``model.vision`` and ``data`` config sections."""
    return MediaOptions(patch_size=vision.patch_size, merge=vision.spatial_merge_size,
                        temporal_patch=vision.temporal_patch_size, min_pixels=data.min_pixels,
                        max_pixels=data.max_pixels, video_fps=data.video_fps,
                        video_source_fps=data.video_source_fps, max_frames=data.max_frames)


def _paths(record: dict, one: str, many: str) -> list[str]:
    if one in record and many in record:
        raise RejectedSample("malformed", f'give "{one}" or "{many}", not both')
    value = [record[one]] if one in record else record.get(many, [])
    if not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
        raise RejectedSample("malformed", f'"{one}" must be a path, "{many}" a list of paths')
    return value


def _probe(kind: str, rel: str, base_dir: str, opts: MediaOptions, fps, verify: bool) -> MediaItem:
    path = os.path.join(base_dir, rel)
    try:
        return probe_image(path, opts, verify) if kind == "image" else probe_video(path, opts, fps, verify)
    except FileNotFoundError:
        raise RejectedSample(f"missing_{kind}", f"{kind} {rel} is missing") from None
    except (OSError, ValueError) as e:
        raise RejectedSample(f"corrupt_{kind}", str(e).replace(path, rel)) from None


def parse_native_line(raw: bytes, base_dir: str, tok: Tokenizer, seq_len: int, opts: MediaOptions,
                      video_id: Optional[int], verify: bool = True) -> tuple:
    """(EncodedChat, media items, question_type) of one JSONL line; raises RejectedSample(reason, detail).

    ``verify``: decode every image and sampled frame (else read the headers: the line was indexed)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RejectedSample("malformed", f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RejectedSample("malformed", "a sample must be a JSON object")
    problem = check_messages(record.get("messages"))
    if problem:
        raise RejectedSample("malformed", problem)
    images, videos = _paths(record, "image", "images"), _paths(record, "video", "videos")
    fps = record.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise RejectedSample("malformed", f'"fps"={fps!r} must be a positive number (the frames\' rate)')
    messages = record["messages"]
    for tag, count, items in (("<image>", count_image_tags(messages), images),
                              ("<video>", count_video_tags(messages), videos)):
        if count != len(items):
            raise RejectedSample("placeholder_mismatch", f"{count} {tag} tags in the messages but {len(items)} "
                                               f"{tag[1:-1]}s")
    if videos and video_id is None:
        raise RejectedSample("malformed", f"the sample has a video but the tokenizer has no {tok.specials.video} piece "
                                "(train it with tools/train_tokenizer.py)")
    media = [_probe("image", p, base_dir, opts, None, verify) for p in images]
    media += [_probe("video", p, base_dir, opts, fps, verify) for p in videos]
    counts = [m.tokens(opts.merge) for m in media]
    encoded = encode_chat_media(messages, tok, counts[:len(images)], counts[len(images):], video_id)
    if len(encoded.input_ids) > seq_len:
        raise RejectedSample("too_long", f"sample is {len(encoded.input_ids)} tokens ({sum(counts)} image/video tokens), "
                               f"longer than data.seq_len={seq_len}")
    return encoded, media, record.get("question_type")


def _index_line(tok: Tokenizer, opts: MediaOptions, video_id: Optional[int]):
    """The jsonl_index line check of a native-resolution tower: every image and sampled frame decoded once."""
    def index_line(raw: bytes, base_dir: str) -> tuple:
        try:
            encoded, media, _ = parse_native_line(raw, base_dir, tok, sys.maxsize, opts, video_id)
        except RejectedSample as e:
            return STATUS.index(e.reason), 0, 0, e.detail
        return OK, len(encoded.input_ids), len(media), None
    return index_line


class NativeMultimodalDataset(LazyMultimodalDataset):
    """LazyMultimodalDataset for a native-resolution tower: images of any size and videos per sample.

    Nothing of a sample stays in memory but where its line is and its length: each JSONL file's
    index (engine/data/jsonl_index.py, cached beside it and keyed by the media settings too) probes
    every image and video once, and ``dataset[s]`` reads the lines of sequence ``s`` again, resolves
    their media from the headers and decodes them. A medium that is gone or corrupt since the index
    was built raises naming its file and line (``error``), or leaves its sample's slot as padding
    and counts it (``skip``), as for the fixed-size tower.
    """

    def __init__(self, files: Sequence[str], file_ids: np.ndarray, offsets: np.ndarray, lines: np.ndarray,
                 lengths: np.ndarray, seq_len: int, tokenizer: Tokenizer, opts: MediaOptions, seed: int,
                 pack_window: Optional[int] = None, bad_samples: Sequence[BadSample] = (),
                 on_bad_sample: str = "error"):
        super().__init__(files, file_ids, offsets, lines, lengths, seq_len, tokenizer, 0, None, seed, pack_window,
                         bad_samples, on_bad_sample)
        self.opts, self.video_id = opts, tokenizer.video_id

    @classmethod
    def from_jsonl(cls, paths, tokenizer: Tokenizer, seq_len: int, *, opts: MediaOptions, seed: int,
                   on_bad_sample: str = "error", pack_window: Optional[int] = None) -> "NativeMultimodalDataset":
        """Index (or read the cached indexes of) one or more JSONL files; bad samples raise (``error``,
        naming the file and line) or are counted (``skip``) here, before training."""
        files, columns, bad = index_files(paths, tokenizer, seq_len, None, on_bad_sample,
                                          _index_line(tokenizer, opts, tokenizer.video_id), dataclasses.asdict(opts))
        return cls(files, *columns, seq_len, tokenizer, opts, seed, pack_window, bad, on_bad_sample)

    @classmethod
    def from_config(cls, data_cfg, split: str, *, vision, seed: int) -> "NativeMultimodalDataset":
        path = getattr(data_cfg, f"{split}_jsonl")
        if path is None:
            raise ValueError(f"data.{split}_jsonl is not set")
        return cls.from_jsonl(path, Tokenizer.load(data_cfg.tokenizer), data_cfg.seq_len,
                              opts=media_options(vision, data_cfg), seed=seed, on_bad_sample=data_cfg.on_bad_sample,
                              pack_window=data_cfg.pack_window)

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        return {r: sum(b.reason == r for b in self.bad_samples) for r in BAD_SAMPLE_REASONS}

    def sample(self, i: int) -> NativeChatSample:
        """Sample ``i``, read from its line and encoded again; raises RejectedSample for media gone or corrupt since."""
        path, line = self.files[self.file_ids[i]], int(self.lines[i])
        base_dir = os.path.dirname(os.path.abspath(path))
        try:
            encoded, media, qtype = parse_native_line(read_line(path, self.offsets[i]), base_dir, self.tokenizer,
                                                      sys.maxsize, self.opts, self.video_id, verify=False)
        except RejectedSample as e:
            if e.reason not in ("malformed", "placeholder_mismatch"):  # a medium, not the text, changed
                raise RejectedSample(e.reason, f"{e.detail} (since its index {cache_path(path)} was built)") from None
            encoded = None
        if encoded is None or len(encoded.input_ids) != self.lengths[i]:
            raise BadSampleError(f"{path}:{line}: the line changed after its index {cache_path(path)} was built; "
                             "restart to rebuild it")
        paths = [m.path for m in media if m.kind == "image"]
        return NativeChatSample(encoded.input_ids, encoded.labels, paths, qtype, path, line, media)

    def __getitem__(self, s: int) -> NativeSequence:
        ids = self._sequence_ids(s)
        docs, media = [], []
        for i in ids.tolist():
            try:
                doc = self.sample(i)
                media.append(media_arrays(doc.media, self.opts, base=os.path.dirname(os.path.abspath(doc.file))))
            except RejectedSample as e:
                path, line, n = self.files[self.file_ids[i]], int(self.lines[i]), int(self.lengths[i])
                doc = self._drop(ChatSample(np.zeros(n, np.int64), np.zeros(n, np.int64), [], None, path, line), e)
                media.append(media_arrays([], self.opts))
            docs.append(doc)
        seq = self._assemble(ids, docs)
        return NativeSequence(**{f.name: getattr(seq, f.name) for f in dataclasses.fields(seq)}, media=media)

    def collate(self, sequences: Sequence[NativeSequence]) -> Microbatch:
        """Text fields as ``sampler.collate``, plus the images' and the videos' patches and grids (None when none)."""
        return dataclasses.replace(collate(sequences), **native_media_fields([m for s in sequences for m in s.media]))


MEDIA_FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def media_arrays(items: Sequence[MediaItem], opts: MediaOptions, only_first_frame: bool = False,
                 base: Optional[str] = None) -> dict[str, np.ndarray]:
    """The batch fields (MEDIA_FIELDS) of ``items``, decoded, as numpy; a kind without items has zero rows.

    Raises RejectedSample naming the file (relative to ``base``) of a medium that cannot be decoded."""
    out = {}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        mine = [m for m in items if m.kind == kind]
        parts = [media_patches([], opts)]  # zero rows of the right width when there are none
        for m in mine:
            try:
                parts.append(media_patches([m], opts, only_first_frame))
            except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
                rel = os.path.relpath(m.path, base) if base else m.path
                raise RejectedSample(f"corrupt_{kind}", f"{kind} {rel} cannot be decoded ({type(e).__name__}: {e})") from None
        out[pixels], out[grid] = (np.concatenate(x) for x in zip(*parts))
    out["second_per_grid_ts"] = np.asarray([m.second_per_grid_t for m in items if m.kind == "video"], np.float32)
    return out


def native_media_fields(parts: Sequence[dict]) -> dict:
    """``media_arrays`` of several documents joined in order, as tensors: ``pixel_values`` float32 ``[patches,
    C*tp*p*p]``, ``image_grid_thw`` int64 ``[images, 3]``; ``pixel_values_videos``, ``video_grid_thw``,
    ``second_per_grid_ts`` float32 ``[videos]``. A kind without items gets None."""
    out = {}
    for name in MEDIA_FIELDS:
        joined = np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
        out[name] = torch.from_numpy(joined) if len(joined) else None
    return out


__all__ = ["NativeMultimodalDataset", "NativeChatSample", "media_options", "native_media_fields",
           "media_arrays", "parse_native_line"]
