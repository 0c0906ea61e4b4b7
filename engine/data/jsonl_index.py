"""A byte-offset index of a chat JSONL file, built in one streaming pass and cached beside it.

Per non-blank line the index holds what packing and the bad-sample checks need, so that no
sample has to stay in memory: its byte offset and line number, its token count after the chat
template, its number of images and a status (``ok``, ``malformed``, ``placeholder_mismatch``,
``missing_image``: the text-level problems, and image files that do not exist, found by a stat)
with a message for each bad line. Whether a sample is too long depends on ``seq_len`` and is
decided when the index is read, so a new ``seq_len`` reuses the cache. Decoding an image costs
far more than a stat; corrupt images are found when their sample is read. The stat is cached
too: an image added after the index was built counts as missing until the JSONL changes.

The cache is ``FILE.loomidx.npz``. It records the key it was built for, the JSONL's size and
modification time, the tokenizer's fingerprint and the placeholder tokens per image, and any
difference rebuilds it. It is written under a temporary name and renamed, so a reader sees a
whole file or none. One process builds while the others wait on a lock file beside it (other
ranks of the job, other jobs on the machine); without one (a filesystem without ``flock``),
concurrent builders write identical files and the last rename wins. An unwritable directory
means no cache, and a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
import zipfile
from array import array
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from loom.data.multimodal import BadSample, BadSampleError, RejectedSample, encode_line, jsonl_paths, too_long
from loom.data.tokenizer import Tokenizer

INDEX_VERSION = 2
# A native-resolution tower's index (engine/data/multimodal_native.py) probes every image and video
# while indexing, so its lines can also be corrupt or miss a video.
STATUS = ("ok", "malformed", "placeholder_mismatch", "missing_image", "corrupt_image", "missing_video",
          "corrupt_video")
OK, MISSING = 0, STATUS.index("missing_image")
CACHE_SUFFIX = ".loomidx.npz"


@dataclass
class JsonlIndex:
    """One JSONL file's lines, arrays of ``[n]`` over its non-blank lines in file order.

    offsets:    int64 byte offset of the line
    lines:      int32 1-based line number
    lengths:    int32 tokens after the chat template (0 where the line cannot be encoded)
    num_images: int32 images of the sample (a native-resolution index: images and videos)
    status:     int8 index into STATUS
    details:    what is wrong, by row, for every row whose status is not ok
    """

    path: str
    offsets: np.ndarray
    lines: np.ndarray
    lengths: np.ndarray
    num_images: np.ndarray
    status: np.ndarray
    details: dict[int, str]

    def classify(self, seq_len: int, image_tokens: Optional[int]) -> tuple[np.ndarray, list[BadSample]]:
        """(rows of the usable samples, bad samples in file order) for ``seq_len``.

        The reasons take the order of the eager checks: malformed or mismatched text, then too
        long, then a missing image. ``image_tokens``: per image, for the message (None: images
        differ in size).
        """
        text_bad = (self.status != OK) & (self.status != MISSING)
        long = ~text_bad & (self.lengths > seq_len)
        bad = text_bad | long | (self.status == MISSING)
        out = []
        for row in np.flatnonzero(bad).tolist():
            if long[row] and image_tokens is None:
                reason, detail = "too_long", f"sample is {self.lengths[row]} tokens, longer than data.seq_len={seq_len}"
            elif long[row]:
                problem = too_long(int(self.lengths[row]), int(self.num_images[row]), image_tokens, seq_len)
                reason, detail = problem.reason, problem.detail
            else:
                reason, detail = STATUS[self.status[row]], self.details[row]
            line = int(self.lines[row])
            out.append(BadSample(self.path, line, reason, f"{self.path}:{line}: {detail}"))
        return np.flatnonzero(~bad), out


def cache_path(path: str) -> str:
    return path + CACHE_SUFFIX


def index_key(path: str, tok: Tokenizer, image_tokens: int, media: Optional[dict] = None) -> dict:
    """What the cached index depends on; a change in any of it rebuilds the index."""
    st = os.stat(path)
    key = {"version": INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "tokenizer": tok.fingerprint(), "image_tokens": int(image_tokens)}
    if media is not None:  # as the cache stores it (JSON), so that equal settings compare equal
        key["media"] = json.loads(json.dumps(media))
    return key


def load_or_build(path: str, tok: Tokenizer, image_tokens: int, index_line: Optional[Callable] = None,
                  media: Optional[dict] = None) -> JsonlIndex:
    """The index of ``path``: from its cache when the key matches, else built (once) and cached.

    ``index_line(raw, base_dir) -> (status, tokens, images, detail or None)`` indexes a line in
    place of the fixed-size tower's check; ``media``: the settings it depends on (part of the key).
    """
    path = os.fspath(path)
    key = index_key(path, tok, image_tokens, media)  # before reading: a file changed mid-build fails the next check
    index = _load(path, key)
    if index is not None:
        return index
    with _build_lock(cache_path(path)):
        index = _load(path, key)  # built by another process while this one waited
        if index is None:
            index = build_index(path, tok, image_tokens, index_line)
            _save(index, key)
    return index


def index_files(paths, tok: Tokenizer, seq_len: int, image_tokens: Optional[int], on_bad_sample: str,
                index_line: Optional[Callable] = None, media: Optional[dict] = None) -> tuple:
    """(files, ``[file_ids, offsets, lines, lengths]`` arrays over the usable samples of all files, bad
    samples) from each file's index; a bad sample raises here with ``on_bad_sample="error"``, before
    training. ``image_tokens``: per image (None: images of any size, ``index_line`` and ``media`` given)."""
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r} must be error or skip")
    files, parts, bad = jsonl_paths(paths), [], []
    for k, path in enumerate(files):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JSONL file not found: {path}")
        index = load_or_build(path, tok, image_tokens or 0, index_line, media)
        rows, bad_k = index.classify(seq_len, image_tokens)
        if bad_k and on_bad_sample == "error":
            raise BadSampleError(bad_k[0].message)
        bad += bad_k
        parts.append((np.full(len(rows), k, np.int32), index.offsets[rows], index.lines[rows], index.lengths[rows]))
    return files, [np.concatenate(c) for c in zip(*parts)], bad


def read_line(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(int(offset))
        return f.readline()


# ----------------------------------------------------------------------------- building


class _Exists:
    """os.path.isfile with a bounded memo: many samples may share an image."""

    def __init__(self, limit: int = 1 << 16):
        self.seen: dict[str, bool] = {}
        self.limit = limit

    def __call__(self, path: str) -> bool:
        if path not in self.seen:
            if len(self.seen) >= self.limit:
                self.seen.clear()
            self.seen[path] = os.path.isfile(path)
        return self.seen[path]


def _index_line(raw: bytes, base_dir: str, tok: Tokenizer, image_tokens: int, exists: _Exists) -> tuple:
    """(status, tokens, images, detail or None) of one line."""
    try:
        encoded, images, _ = encode_line(raw, tok, image_tokens)
    except RejectedSample as e:
        return STATUS.index(e.reason), 0, 0, e.detail
    missing = next((rel for rel in images if not exists(os.path.join(base_dir, rel))), None)
    if missing is not None:
        return MISSING, len(encoded.input_ids), len(images), f"image {missing} is missing"
    return OK, len(encoded.input_ids), len(images), None


def build_index(path: str, tok: Tokenizer, image_tokens: int, index_line: Optional[Callable] = None) -> JsonlIndex:
    """One pass over the file, a line at a time; compact arrays grow as it goes."""
    base_dir = os.path.dirname(os.path.abspath(path))
    offsets, lines, lengths, images = array("q"), array("i"), array("i"), array("i")
    status, details, offset = array("b"), {}, 0
    if index_line is None:
        exists = _Exists()
        index_line = lambda raw, base: _index_line(raw, base, tok, image_tokens, exists)  # noqa: E731
    with open(path, "rb") as f:  # bytes: a line of bad UTF-8 is one bad sample, not a crash
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                code, n_tokens, n_images, detail = index_line(raw, base_dir)
                if detail is not None:
                    details[len(offsets)] = detail
                offsets.append(offset)
                lines.append(line_no)
                lengths.append(n_tokens)
                images.append(n_images)
                status.append(code)
            offset += len(raw)
    return JsonlIndex(path, np.frombuffer(offsets, np.int64), np.frombuffer(lines, np.int32),
                      np.frombuffer(lengths, np.int32), np.frombuffer(images, np.int32),
                      np.frombuffer(status, np.int8), details)


# ----------------------------------------------------------------------------- the cache file


def _as_bytes(value) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)


def _from_bytes(array_: np.ndarray):
    return json.loads(array_.tobytes().decode("utf-8"))


def _load(path: str, key: dict) -> JsonlIndex | None:
    try:
        with np.load(cache_path(path), allow_pickle=False) as z:
            if _from_bytes(z["key"]) != key:
                return None
            details = {int(row): text for row, text in _from_bytes(z["details"])}
            return JsonlIndex(path, z["offsets"], z["lines"], z["lengths"], z["num_images"], z["status"], details)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged or foreign: rebuild
        warnings.warn(f"ignoring the unreadable index {cache_path(path)} ({type(e).__name__}: {e})", stacklevel=2)
        return None


def _save(index: JsonlIndex, key: dict) -> None:
    """Write under a temporary name, then rename: the cache is whole or absent, never partial."""
    final = cache_path(index.path)
    tmp = f"{final}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=_as_bytes(key), offsets=index.offsets, lines=index.lines, lengths=index.lengths,
                     num_images=index.num_images, status=index.status,
                     details=_as_bytes(sorted(index.details.items())))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        warnings.warn(f"cannot cache the index of {index.path} as {final} ({e}); it is rebuilt at every start",
                      stacklevel=2)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def _build_lock(final: str):
    """An exclusive flock on ``final + '.lock'``; nothing where the directory is not writable."""
    import fcntl

    try:
        handle = open(final + ".lock", "ab")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
