"""Images and videos for a native-resolution tower (Qwen2-VL family): sizes, frame sampling, patches.

An image keeps its aspect ratio: it is resized to the nearest multiple of ``patch * merge`` on each
side, scaled down when it holds more than ``max_pixels`` (up below ``min_pixels``), as Qwen's
``smart_resize``. A video is a directory of frame images (sorted by name), a multi-frame image
file Pillow reads (GIF, APNG, TIFF), or a container file (mp4, mkv, webm, avi, mov) decoded by PyAV
when it is installed (``pip install av``; optional, imported only for such a file). Frames are
sampled, every frame resized to the size of the first, and the count made a multiple of
``temporal_patch`` by repeating the last frame.

Frame sampling: the frames are a clip at ``source_fps`` frames a second (a sample's ``"fps"``,
else a container's own frame rate, else ``data.video_source_fps``). ``fps`` (``data.video_fps``)
keeps frame ``floor(k * source_fps / fps)`` for k = 0, 1, ... (null, or fps >= source_fps: every
frame); when more than ``max_frames`` remain, ``max_frames`` of them are kept evenly spaced, first
and last included. The sampled rate (kept frames over the clip's seconds) sets
``second_per_grid_t = temporal_patch / rate``, the seconds one temporal patch spans (M-RoPE's
temporal step).

Flattening follows transformers' Qwen2-VL image processor: frames ``[T, C, H, W]`` become
``[T/tp * H/p * W/p, C * tp * p * p]`` patches in merge-block order, with grid ``(T/tp, H/p, W/p)``;
one LLM token per ``merge x merge`` block, so ``T/tp * H/p/merge * W/p/merge`` placeholders.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from loom.data.images import CLIP_MEAN, CLIP_STD, normalize_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CONTAINER_SUFFIXES = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov")


@dataclass(frozen=True)
class MediaOptions:
    """The data-side settings of a native-resolution tower (model.vision + data sections)."""

    patch_size: int = 14
    merge: int = 2
    temporal_patch: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 16384
    video_fps: Optional[float] = None
    video_source_fps: float = 2.0
    max_frames: int = 16
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge


@dataclass(frozen=True)
class MediaItem:
    """One image or video of a sample, resolved at preparation time.

    frames: the image path (one entry), or the video's sampled frames: ``(path, frame index in the
            file)`` pairs, the index 0 for a frame directory; padded to a multiple of temporal_patch
    grid:   ``(t, h, w)`` in patches
    """

    kind: str  # image | video
    path: str
    frames: tuple
    height: int
    width: int
    grid: tuple
    second_per_grid_t: float = 1.0

    def tokens(self, merge: int) -> int:
        t, h, w = self.grid
        return t * h * w // (merge * merge)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of ``factor``, near the input's aspect ratio, pixels within [min, max]."""
    if min(height, width) < 1:
        raise ValueError(f"an image of {width}x{height} pixels is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sample_frame_indices(num_frames: int, source_fps: float, fps: Optional[float], max_frames: int,
                         temporal_patch: int) -> tuple[list[int], float]:
    """(frame indices, sampled frames per second); see the module docstring. The count is a
    multiple of ``temporal_patch`` (the last index repeated), at most ``max_frames`` rounded up to one."""
    if num_frames < 1:
        raise ValueError("the video has no frames")
    step = 1.0 if fps is None or fps >= source_fps else source_fps / fps
    keep = sorted({int(math.floor(k * step)) for k in range(int(math.ceil(num_frames / step)))})
    if len(keep) > max_frames:
        keep = [keep[int(round(i))] for i in np.linspace(0, len(keep) - 1, max_frames)]
    rate = len(keep) * source_fps / num_frames
    keep += [keep[-1]] * (-len(keep) % temporal_patch)
    return keep, rate


def list_frames(path: str) -> list[tuple[str, int]]:
    """The frames of a frame directory or a multi-frame image: ``(file, index in file)`` pairs; raises
    ValueError naming the path. A container's come from ``container_info``."""
    from PIL import Image

    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES))
        if not names:
            raise ValueError(f"video {path} is a directory without frame images ({', '.join(FRAME_SUFFIXES)})")
        return [(os.path.join(path, n), 0) for n in names]
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path} is missing")
    try:
        with Image.open(path) as img:
            n = getattr(img, "n_frames", 1)
    except Exception as e:
        raise ValueError(f"video {path} cannot be read ({type(e).__name__}: {e}); give a directory of frame "
                         f"images, a GIF/APNG/TIFF or a container file ({', '.join(CONTAINER_SUFFIXES)})") from None
    return [(path, k) for k in range(n)]


def is_container(path: str) -> bool:
    return path.lower().endswith(CONTAINER_SUFFIXES)


def _av(path: str):
    """PyAV, imported for a container file only. Missing, it stops the run (an ImportError, never a
    bad sample to skip): every container video would be dropped otherwise."""
    try:
        import av
    except ImportError:
        raise ImportError(f"video {path} is a container file: decoding it needs PyAV (pip install av); "
                          "or give a directory of frame images or a GIF/APNG/TIFF") from None
    return av


def container_info(path: str) -> tuple[int, Optional[float], tuple[int, int]]:
    """(frames, frames a second or None, (width, height)) of a container's first video stream, from
    its header; where the header does not say (Matroska, WebM) the frames are counted from the
    packets, which reads the file without decoding it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"video {path} is missing")
    av = _av(path)
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            size = (stream.codec_context.width, stream.codec_context.height)
            n = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    except Exception as e:  # FFmpeg's errors, or IndexError: no video stream
        raise ValueError(f"video {path} cannot be read ({type(e).__name__}: {e})") from None
    if n < 1 or min(size) < 1:
        raise ValueError(f"video {path} has no frames")
    return n, rate, size


def _decode_container(path: str, indices: set[int]) -> dict:
    """Frame index -> PIL RGB image, for ``indices`` of a container, in one decoding pass."""
    av, out, last = _av(path), {}, max(indices)
    try:
        with av.open(path) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in indices:
                    out[k] = frame.to_image()
                if k >= last:
                    break
    except Exception as e:
        raise ValueError(f"video {path} cannot be decoded ({type(e).__name__}: {e})") from None
    if len(out) < len(indices):
        raise ValueError(f"video {path}: frame {min(indices - out.keys())} cannot be decoded (the stream ends "
                         "before it)")
    return out


def _frame_images(frames) -> dict:
    """``(path, index)`` -> decoded PIL image, for each distinct frame; a container is decoded once."""
    out, wanted = {}, {}
    for path, index in frames:
        if is_container(path):
            wanted.setdefault(path, set()).add(index)
        elif (path, index) not in out:
            out[(path, index)] = _open_frame(path, index)
    for path, indices in wanted.items():
        out.update(((path, k), img) for k, img in _decode_container(path, indices).items())
    return out


def _open_frame(path: str, index: int, decode: bool = True):
    from PIL import Image

    img = Image.open(path)
    if index:
        img.seek(index)
    if decode:
        img.load()
    return img


def probe_image(path: str, opts: MediaOptions, verify: bool = True) -> MediaItem:
    """The image's resized size and grid; raises OSError/ValueError (naming the file) when it cannot be decoded.

    ``verify=False`` reads the header only (a sample read again after its index checked it)."""
    try:
        with _open_frame(path, 0, verify) as img:
            width, height = img.size
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} is missing") from None
    except Exception as e:
        raise ValueError(f"image {path} cannot be decoded ({type(e).__name__}: {e})") from None
    h, w = smart_resize(height, width, opts.factor, opts.min_pixels, opts.max_pixels)
    return MediaItem("image", path, ((path, 0),), h, w, (1, h // opts.patch_size, w // opts.patch_size))


def probe_video(path: str, opts: MediaOptions, source_fps: Optional[float] = None, verify: bool = True
                ) -> MediaItem:
    """The video's sampled frames, resized size and grid; every sampled frame is decoded once here
    (``verify=False``: headers only, the first frame's or the container's)."""
    container = is_container(path)
    if container:
        n, rate, size = container_info(path)
        frames = [(path, k) for k in range(n)]
    else:
        frames, rate, size = list_frames(path), None, None
    fps = source_fps if source_fps is not None else rate or opts.video_source_fps
    keep, rate = sample_frame_indices(len(frames), fps, opts.video_fps, opts.max_frames, opts.temporal_patch)
    chosen = tuple(frames[k] for k in keep)
    if container:
        if verify:
            _decode_container(path, set(keep))
    else:
        for file, index in list(dict.fromkeys(chosen))[:None if verify else 1]:
            try:
                with _open_frame(file, index, verify) as img:
                    size = size or img.size
            except Exception as e:
                raise ValueError(f"video {path}: frame {file} cannot be decoded ({type(e).__name__}: {e})") from None
    width, height = size
    h, w = smart_resize(height, width, opts.factor, opts.min_pixels, opts.max_pixels)
    p = opts.patch_size
    return MediaItem("video", path, chosen, h, w, (len(chosen) // opts.temporal_patch, h // p, w // p),
                     opts.temporal_patch / rate)


def load_pixels(item: MediaItem, opts: MediaOptions, only_first_frame: bool = False) -> np.ndarray:
    """float32 ``[frames, 3, H, W]`` normalised; an image is repeated to one temporal patch.

    ``only_first_frame``: every frame is the first one (an eval control: no motion left to see).
    """
    from PIL import Image

    frames = item.frames[:1] * len(item.frames) if only_first_frame else item.frames
    if item.kind == "image":
        frames = frames * opts.temporal_patch
    distinct = {frame: i for i, frame in enumerate(dict.fromkeys(frames))}  # a repeated frame is decoded once
    decoded = []
    images = _frame_images(distinct)
    for frame in distinct:
        with images[frame] as img:
            rgb = img.convert("RGB")
        if rgb.size != (item.width, item.height):
            rgb = rgb.resize((item.width, item.height), Image.Resampling.BICUBIC)
        decoded.append(np.asarray(rgb))
    pixels = normalize_rgb(np.stack(decoded), opts.mean, opts.std)
    return pixels[[distinct[frame] for frame in frames]]


def patchify(frames: np.ndarray, patch: int, temporal: int, merge: int) -> tuple[np.ndarray, tuple]:
    """``[T, C, H, W]`` -> (``[T/tp * H/p * W/p, C*tp*p*p]`` patches in merge-block order, grid (t, h, w))."""
    t, c, height, width = frames.shape
    gt, gh, gw = t // temporal, height // patch, width // patch
    if t % temporal or height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"frames {tuple(frames.shape)} do not tile into temporal patches of {temporal} and "
                         f"{merge}x{merge} blocks of {patch}-pixel patches")
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal * patch * patch)), (gt, gh, gw)


def media_patches(items: Sequence[MediaItem], opts: MediaOptions, only_first_frame: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(patches ``[sum patches, C*tp*p*p]`` float32, grid_thw int64 ``[len(items), 3]``) of items in order."""
    width = 3 * opts.temporal_patch * opts.patch_size ** 2
    if not items:
        return np.zeros((0, width), np.float32), np.zeros((0, 3), np.int64)
    parts, grids = [], []
    for item in items:
        patches, grid = patchify(load_pixels(item, opts, only_first_frame), opts.patch_size, opts.temporal_patch,
                                 opts.merge)
        assert grid == item.grid, (grid, item.grid)  # the probe and the decode must agree
        parts.append(patches)
        grids.append(grid)
    return np.concatenate(parts), np.asarray(grids, np.int64)
