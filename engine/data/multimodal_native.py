"""Packed chat samples with images of any size and videos, for a native-resolution tower (Qwen2.5-VL).

A JSONL line is one sample, media paths relative to the file's directory::

    {"messages": [{"role": "user", "content": "<video>Which way does the shape move?"},
                  {"role": "assistant", "content": "left"}],
     "video": "frames/0001", "fps": 8}

``"image"`` / ``"video"`` name one item, ``"images"`` / ``"videos"`` a list; the k-th ``<image>``
(``<video>``) tag takes the k-th image (video). ``"fps"``: the frames' rate (default
``data.video_source_fps``). Sizes, frame sampling and patches: engine/data/media.py. Each item's
placeholder count is known at preparation time, so packing stays a pure function of the
sample lengths (engine/data/multimodal_packing.py), and images and videos pack with text.
A microbatch carries transformers' inputs: ``pixel_values`` + ``image_grid_thw``,
``pixel_values_videos`` + ``video_grid_thw`` + ``second_per_grid_ts``; the model derives the
M-RoPE positions from them (VisionLanguageModel.rope_positions).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from engine.data.chat import check_messages, count_image_tags, count_video_tags, encode_chat_media
from engine.data.media import MediaItem, MediaOptions, media_patches, probe_image, probe_video
from engine.data.multimodal import BadSample, ChatSample, MultimodalDataset, MultimodalSequence, _Bad
from engine.data.sampler import Microbatch, collate
from engine.data.tokenizer import Tokenizer

NATIVE_BAD_SAMPLE_REASONS = ("malformed", "placeholder_mismatch", "too_long", "missing_image", "corrupt_image",
                             "missing_video", "corrupt_video")


@dataclass
class NativeChatSample(ChatSample):
    """A ChatSample whose ``media`` (images and videos, each in tag order) are resolved to sizes and frames."""

    media: list = dataclasses.field(default_factory=list)


@dataclass
class NativeSequence(MultimodalSequence):
    media: list = dataclasses.field(default_factory=list)  # MediaItems of the sequence, in sample order


def media_options(vision, data) -> MediaOptions:
    """MediaOptions from ``model.vision`` and ``data`` config sections."""
    return MediaOptions(patch_size=vision.patch_size, merge=vision.spatial_merge_size,
                        temporal_patch=vision.temporal_patch_size, min_pixels=data.min_pixels,
                        max_pixels=data.max_pixels, video_fps=data.video_fps,
                        video_source_fps=data.video_source_fps, max_frames=data.max_frames)


def _paths(record: dict, one: str, many: str) -> list[str]:
    if one in record and many in record:
        raise _Bad("malformed", f'give "{one}" or "{many}", not both')
    value = [record[one]] if one in record else record.get(many, [])
    if not (isinstance(value, list) and all(isinstance(p, str) for p in value)):
        raise _Bad("malformed", f'"{one}" must be a path, "{many}" a list of paths')
    return value


def _probe(kind: str, rel: str, base_dir: str, opts: MediaOptions, fps) -> MediaItem:
    path = os.path.join(base_dir, rel)
    try:
        return probe_image(path, opts) if kind == "image" else probe_video(path, opts, fps)
    except FileNotFoundError:
        raise _Bad(f"missing_{kind}", f"{kind} {rel} is missing") from None
    except (OSError, ValueError) as e:
        raise _Bad(f"corrupt_{kind}", str(e).replace(path, rel)) from None


def parse_native_line(raw: bytes, base_dir: str, tok: Tokenizer, seq_len: int, opts: MediaOptions,
                      video_id: Optional[int]) -> tuple:
    """(EncodedChat, media items, question_type) of one JSONL line; raises _Bad(reason, detail)."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Bad("malformed", f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise _Bad("malformed", "a sample must be a JSON object")
    problem = check_messages(record.get("messages"))
    if problem:
        raise _Bad("malformed", problem)
    images, videos = _paths(record, "image", "images"), _paths(record, "video", "videos")
    fps = record.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
        raise _Bad("malformed", f'"fps"={fps!r} must be a positive number (the frames\' rate)')
    messages = record["messages"]
    for tag, count, items in (("<image>", count_image_tags(messages), images),
                              ("<video>", count_video_tags(messages), videos)):
        if count != len(items):
            raise _Bad("placeholder_mismatch", f"{count} {tag} tags in the messages but {len(items)} "
                                               f"{tag[1:-1]}s")
    if videos and video_id is None:
        raise _Bad("malformed", f"the sample has a video but the tokenizer has no {tok.specials.video} piece "
                                "(train it with tools/train_tokenizer.py)")
    media = [_probe("image", p, base_dir, opts, None) for p in images]
    media += [_probe("video", p, base_dir, opts, fps) for p in videos]
    counts = [m.tokens(opts.merge) for m in media]
    encoded = encode_chat_media(messages, tok, counts[:len(images)], counts[len(images):], video_id)
    if len(encoded.input_ids) > seq_len:
        raise _Bad("too_long", f"sample is {len(encoded.input_ids)} tokens ({sum(counts)} image/video tokens), "
                               f"longer than data.seq_len={seq_len}")
    return encoded, media, record.get("question_type")


def read_native_jsonl(path: str, tok: Tokenizer, seq_len: int, opts: MediaOptions, on_bad_sample: str = "error",
                      video_id: Optional[int] = None) -> tuple[list[NativeChatSample], list[BadSample]]:
    """``read_chat_jsonl`` for a native-resolution tower: every image and sampled frame is decoded once here."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r} must be error or skip")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSONL file not found: {path}")
    base_dir = os.path.dirname(os.path.abspath(path))
    good, bad = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                encoded, media, qtype = parse_native_line(raw, base_dir, tok, seq_len, opts, video_id)
            except _Bad as e:
                message = f"{path}:{line_no}: {e.detail}"
                if on_bad_sample == "error":
                    raise ValueError(message) from None
                bad.append(BadSample(path, line_no, e.reason, message))
                continue
            paths = [m.path for m in media if m.kind == "image"]
            good.append(NativeChatSample(encoded.input_ids, encoded.labels, paths, qtype, path, line_no, media))
    return good, bad


class NativeMultimodalDataset(MultimodalDataset):
    """MultimodalDataset for a native-resolution tower: variable-size images and videos per sample."""

    def __init__(self, samples: list[NativeChatSample], seq_len: int, tokenizer: Tokenizer, opts: MediaOptions,
                 seed: int, pack_window: Optional[int] = None, bad_samples: Sequence[BadSample] = ()):
        self.samples, self.opts, self.video_id = samples, opts, tokenizer.video_id
        self._setup([len(s.input_ids) for s in samples], seq_len, tokenizer, 0, None, seed, pack_window,
                    bad_samples)

    @classmethod
    def from_jsonl(cls, paths, tokenizer: Tokenizer, seq_len: int, *, opts: MediaOptions, seed: int,
                   on_bad_sample: str = "error", pack_window: Optional[int] = None) -> "NativeMultimodalDataset":
        samples, bad = [], []
        for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            good_k, bad_k = read_native_jsonl(os.fspath(path), tokenizer, seq_len, opts, on_bad_sample,
                                              tokenizer.video_id)
            samples += good_k
            bad += bad_k
        return cls(samples, seq_len, tokenizer, opts, seed, pack_window, bad)

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
        return {r: sum(b.reason == r for b in self.bad_samples) for r in NATIVE_BAD_SAMPLE_REASONS}

    def __getitem__(self, s: int) -> NativeSequence:
        seq = super().__getitem__(s)
        media = [m for i in seq.sample_ids for m in self.samples[int(i)].media]
        return NativeSequence(**{f.name: getattr(seq, f.name) for f in dataclasses.fields(seq)}, media=media)

    def collate(self, sequences: Sequence[NativeSequence]) -> Microbatch:
        """Text fields as ``sampler.collate``, plus the images' and the videos' patches and grids (None when none)."""
        items = [m for s in sequences for m in s.media]
        return dataclasses.replace(collate(sequences), **native_media_fields(items, self.opts))


def native_media_fields(items: Sequence[MediaItem], opts: MediaOptions, only_first_frame: bool = False) -> dict:
    """The batch fields of images and videos (each kind in order): ``pixel_values`` float32 ``[patches,
    C*tp*p*p]``, ``image_grid_thw`` int64 ``[images, 3]``; ``pixel_values_videos``, ``video_grid_thw``,
    ``second_per_grid_ts`` float32 ``[videos]``. A kind without items gets None."""
    out = {}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        mine = [m for m in items if m.kind == kind]
        patches, grids = media_patches(mine, opts, only_first_frame)
        out[pixels] = torch.from_numpy(patches) if mine else None
        out[grid] = torch.from_numpy(grids) if mine else None
    videos = [m.second_per_grid_t for m in items if m.kind == "video"]
    out["second_per_grid_ts"] = torch.tensor(videos, dtype=torch.float32) if videos else None
    return out


__all__ = ["NativeMultimodalDataset", "NativeChatSample", "media_options", "native_media_fields",
           "read_native_jsonl", "NATIVE_BAD_SAMPLE_REASONS"]
