"""Loom: a Megatron-style training engine. ``loom.from_pretrained(path)`` loads a model at world size 1."""
from __future__ import annotations

from importlib import metadata

from loom.version import MIN_TORCH, check_torch_version

try:  # metadata, not `import torch`: `import loom.config` (the launcher's fast config check) stays light
    check_torch_version(metadata.version("torch"))
except metadata.PackageNotFoundError:  # a source build without metadata: the import itself will tell
    pass


def from_pretrained(path, **kwargs):
    """A world-size-1 model from a Loom checkpoint or an HF directory; see engine/pretrained.py.

    Imported lazily so that ``import loom.config`` (the launcher's fast config check) stays light.
    """
    from loom.pretrained import from_pretrained as load

    return load(path, **kwargs)


__all__ = ["MIN_TORCH", "check_torch_version", "from_pretrained"]
