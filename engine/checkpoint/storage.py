"""Checkpoint storage: DCP reads and writes at global shapes, the completion marker, discovery.

A checkpoint is a directory:

    .metadata, __R_K.distcp   torch.distributed.checkpoint files; every tensor at its global shape
    checkpoint.json           the completion marker: written last, by rank 0, via tmp + os.replace;
                              holds the step, the configs, and every file's size
    hf/                       optional Hugging Face side files (config.json, tokenizer) from an import

Ranks hand DCP their *local* tensors plus a placement ``name -> (global_shape, offsets)`` (see
engine/parallel/sharding.py); the planners below turn those into DCP chunks. Replicated tensors
(DP replicas, TP-replicated norms) are written once: DCP deduplicates chunks with the same key and
offset. Loading reads, for each local tensor, exactly the saved chunks it overlaps, so any layout
loads any other.

Loading runs no code from the checkpoint. DCP pickles its index (``.metadata``), so it is read
through an allowlist of DCP's own metadata types (``_MetadataUnpickler``) and its file names are
checked to stay inside the directory; tensors come back through ``torch.load(weights_only=True)``;
DCP's one full unpickle, of non-tensor "bytes" items, is refused (``_LoadPlanner.load_bytes``);
side files are JSON.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

import loom.faults as faults

MARKER = "checkpoint.json"
FORMAT = "loom-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{8})")

# (global_shape, offsets), or (global_shape, offsets, stored_name) for one of several local chunks of
# one stored tensor (an optimizer shard cut into boxes): the state key is then the chunk's own.
Placement = tuple


def _stored(key: str, placements: dict) -> str:
    where = placements.get(key)
    return where[2] if where is not None and len(where) > 2 else key


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model; names the file."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


# ----------------------------------------------------------------------------- planners


class _SavePlanner(dcp.DefaultSavePlanner):
    """Writes each local tensor as the chunk ``placements[name]`` of its global tensor."""

    def __init__(self, placements: dict[str, Placement], sources: Optional[dict[str, Callable]] = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placements = placements
        self.sources = sources or {}  # name -> () -> tensor: read lazily, one tensor in memory at a time
        self.keys = {(_stored(k, placements), tuple(w[1])): k for k, w in placements.items()}

    def create_local_plan(self):
        plan = super().create_local_plan()
        items = [self._place(item) for item in plan.items]
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def _place(self, item: WriteItem) -> WriteItem:
        key = item.index.fqn
        if key not in self.placements or item.tensor_data is None:
            return item
        shape, offsets = self.placements[key][:2]
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=item.tensor_data.chunk.sizes)
        data = TensorWriteData(chunk=chunk, properties=item.tensor_data.properties, size=torch.Size(shape))
        index = MetadataIndex(_stored(key, self.placements), torch.Size(offsets))
        return WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=data)

    def lookup_object(self, index: MetadataIndex):
        key = self.keys.get((index.fqn, tuple(index.offset or ())), index.fqn)
        if key in self.sources:
            return self.sources[key]()
        return self.state_dict[key]  # a local tensor, whatever its global offset


class _LoadPlanner(dcp.DefaultLoadPlanner):
    """Fills each local tensor with the region ``placements[name]`` of the saved global tensor."""

    def __init__(self, placements: dict[str, Placement], where: str):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placements, self.where = placements, where

    def create_local_plan(self) -> LoadPlan:
        saved = self.metadata.state_dict_metadata
        missing = sorted({_stored(k, self.placements) for k in self.state_dict} - set(saved))
        if missing:
            raise CheckpointError(f"{self.where} lacks {len(missing)} tensor(s) the model needs: {missing[:8]}")
        requests = []
        for key, tensor in self.state_dict.items():
            fqn = _stored(key, self.placements)
            md = saved[fqn]
            shape, offsets = self.placements.get(key, (tuple(tensor.shape), (0,) * tensor.dim()))[:2]
            if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(shape):
                got = tuple(md.size) if isinstance(md, TensorStorageMetadata) else "bytes"
                raise CheckpointError(f"{self.where}: tensor {fqn!r} has global shape {got}, the model needs {shape}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.size())
            items = create_read_items_for_chunk_list(fqn, md, [chunk])
            if key != fqn:  # the chunk lands in its own local tensor
                items = [dataclasses.replace(i, dest_index=dataclasses.replace(i.dest_index, fqn=key)) for i in items]
            requests += items
        return LoadPlan(requests)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]

    def load_bytes(self, read_item, value) -> None:
        # DCP's default is torch.load(weights_only=False); the plan above only ever asks for tensors.
        raise CheckpointError(f"{self.where}: {read_item.dest_index.fqn!r} is a pickled object, not a tensor")


# ----------------------------------------------------------------------------- safe metadata

# Every global a DCP index names (torch 2.x); anything else in ``.metadata`` is refused unrun.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and the dtypes, checked by type below
    "torch.serialization": {"_get_layout"},  # a table lookup: how torch.layout pickles
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses and the torch values they hold.

    Pickle runs code only through the callables that ``find_class`` returns (REDUCE, NEWOBJ,
    INST, BUILD's ``__setstate__`` all act on them), so an allowlist here is the whole defence.
    """

    def find_class(self, module: str, name: str):
        # torch.__dict__, not getattr: torch's module __getattr__ imports submodules on demand
        if module == "torch" and isinstance(torch.__dict__.get(name), torch.dtype):
            return torch.__dict__[name]
        if name not in _METADATA_GLOBALS.get(module, ()):
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"persistent id {pid!r}")


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by ``_MetadataUnpickler`` and checked before use."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.dir = Path(path)
        self._metadata: Optional[Metadata] = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank files, which Loom never writes
            raise CheckpointError(f"checkpoint {self.dir}: no per-rank DCP metadata")
        if self._metadata is None:
            self._metadata = read_metadata(self.dir)
        return self._metadata


def read_metadata(path: Path) -> Metadata:
    """The DCP index of ``path``, unpickled without running code; CheckpointError naming the file."""
    path = Path(path)
    file = path / ".metadata"
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except _RefusedGlobal as e:
        raise CheckpointError(f"checkpoint {path}: {file} refers to {e}, which is not a DCP metadata type; "
                              "refusing to load it (a crafted file could run code)") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled: many kinds, one message naming the file
        raise CheckpointError(f"checkpoint {path}: cannot read DCP metadata {file} ({type(e).__name__}: {e})") from e
    _check_metadata(md, file)
    return md


def _check_metadata(md, file: Path) -> None:
    """The index has DCP's shape and names only files in its own directory."""
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{file} is not a DCP index (it unpickles to {type(md).__name__})")
    for key, value in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise CheckpointError(f"{file}: entry {key!r} is a {type(value).__name__}, not DCP storage metadata")
    ends: dict[str, int] = {}  # data file -> the bytes the index says it holds
    for index, info in md.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo) \
                or not isinstance(info.offset, int) or not isinstance(info.length, int):
            raise CheckpointError(f"{file}: storage entry {index!r} is not DCP storage info")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{file}: {index.fqn!r} is stored in {name!r}, outside the checkpoint directory")
        ends[name] = max(ends.get(name, 0), info.offset + info.length)
    _check_extents(file, ends)


def _check_extents(file: Path, ends: dict[str, int]) -> None:
    """Each data file holds what the index places in it: else DCP fails deep in torch.load, naming no file."""
    for name, end in sorted(ends.items()):
        data = file.parent / name
        size = data.stat().st_size if data.is_file() else None
        if size is None or size < end:
            held = "is missing" if size is None else f"has {size} bytes"
            raise CheckpointError(f"checkpoint {file.parent} is corrupt: file {name} {held}, its index {file.name} "
                                  f"places {end} bytes in it")


# ----------------------------------------------------------------------------- write


@contextlib.contextmanager
def _single_process(no_dist: bool):
    """DCP warns when it runs without a process group; that is what we asked for."""
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(no_dist: bool) -> None:
    if not no_dist and _is_dist():
        dist.barrier()


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], placements: dict[str, Placement],
                     marker: dict, *, sources: Optional[dict[str, Callable]] = None,
                     side_files: Optional[Callable[[Path], None]] = None, no_dist: bool = False) -> None:
    """Write ``state`` (local tensors) to ``path`` and mark it complete. Collective unless ``no_dist``.

    ``sources`` maps names to loaders called while writing (streaming conversion): then each
    tensor gets its own file, because DCP's writer keeps every tensor of a file alive until the
    file is closed. ``side_files`` is called on rank 0 to add files (e.g. ``hf/``) before the
    marker seals the directory.
    """
    path = Path(path)
    no_dist = no_dist or not _is_dist()
    rank0 = no_dist or dist.get_rank() == 0
    if rank0:
        _clear(path)
        path.mkdir(parents=True)
    _barrier(no_dist)
    with _single_process(no_dist):
        writer = dcp.FileSystemWriter(str(path), single_file_per_rank=not sources)
        dcp.save(state, storage_writer=writer, planner=_SavePlanner(placements, sources), no_dist=no_dist)
    if rank0 and side_files is not None:
        side_files(path)
    faults.in_save(0 if no_dist else dist.get_rank())
    _barrier(no_dist)  # every rank's files are written (and fsynced) before the marker
    if rank0:
        write_marker(path, marker)
    _barrier(no_dist)


def _clear(path: Path) -> None:
    """Remove a stale directory of the same name; its marker first, so it never looks complete."""
    if not path.exists():
        return
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
    shutil.rmtree(path)


def write_marker(path: Path, marker: dict) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")}
    body = {"format": FORMAT, "version": VERSION, **marker, "files": files}
    tmp = path / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_checkpoint(path: Path) -> None:
    _clear(Path(path))


# ----------------------------------------------------------------------------- read


def read_marker(path: Path, check_files: bool = True) -> dict:
    """The marker of a complete checkpoint; CheckpointError naming what is missing or truncated."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MARKER} is missing (the save did not finish)")
    try:
        marker = json.loads(marker_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MARKER} is not valid JSON ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: {MARKER} is not a Loom checkpoint marker")
    if check_files:
        _check_files(path, marker.get("files", {}))
    return marker


def _check_files(path: Path, files: dict[str, int]) -> None:
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint {path} is corrupt: file {name} has {actual} bytes, "
                                  f"{size} were written (truncated or overwritten)")


def saved_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor name in the checkpoint with its global shape and stored dtype."""
    md = read_metadata(path)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def read_checkpoint(path: Path, state: dict[str, torch.Tensor], placements: dict[str, Placement],
                    no_dist: bool = False) -> None:
    """Fill the local tensors of ``state`` in place from ``path``. Collective unless ``no_dist``."""
    no_dist = no_dist or not _is_dist()
    reader = _SafeReader(path)
    reader.read_metadata()  # a refused index raises here on every rank, before DCP's first collective
    try:
        with _single_process(no_dist):
            dcp.load(state, storage_reader=reader,
                     planner=_LoadPlanner(placements, f"checkpoint {path}"), no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - keep the checkpoint's name on top
        inner = _find_checkpoint_error(e)
        if inner is not None:
            raise inner from None
        raise CheckpointError(f"checkpoint {path}: loading failed: {e}") from e


def _find_checkpoint_error(e: BaseException) -> Optional[CheckpointError]:
    """DCP wraps each rank's exception as ``(exception, traceback)`` in CheckpointException; surface ours."""
    for value in getattr(e, "failures", {}).values():
        exc = value[0] if isinstance(value, tuple) else value
        if isinstance(exc, CheckpointError):
            return exc
    return None


# ----------------------------------------------------------------------------- discovery


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step_NNNNNNNN`` directory under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def is_complete(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def latest_checkpoint(root: Path, warn: bool = True) -> Optional[Path]:
    """The newest complete checkpoint under ``root``; newer incomplete ones are skipped with a warning."""
    for step, path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
        if warn:
            warnings.warn(f"ignoring incomplete checkpoint {path} (no {MARKER}; a save that did not finish)",
                          stacklevel=2)
    return None


def prune(root: Path, keep: int, newest: int) -> None:
    """Keep the newest ``keep`` complete checkpoints (0: all); drop incomplete ones older than ``newest``."""
    entries = list_checkpoints(root)
    complete = [p for _, p in entries if is_complete(p)]
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [p for s, p in entries if s < newest and not is_complete(p)]
    for path in doomed:
        remove_checkpoint(path)
