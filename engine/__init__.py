"""Loom: a Megatron-style training engine. ``engine.from_pretrained(path)`` loads a model at world size 1."""
from __future__ import annotations

import re
from importlib import metadata

# The oldest torch with every distributed API Loom calls: DeviceMesh groups built with per-group
# options (``backend_override`` on ``init_device_mesh`` and ``_flatten``) and ``P2POp(group_peer=)``.
# setup.py reads this line; the suite runs on torch 2.13.
MIN_TORCH = "2.9"


def check_torch_version(version: str) -> None:
    """Raise ImportError if ``version`` (a torch version string) is older than MIN_TORCH."""
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < tuple(int(x) for x in MIN_TORCH.split(".")):
        raise ImportError(f"Loom needs torch>={MIN_TORCH} (DeviceMesh backend_override, P2POp group_peer); "
                          f"found torch {version}. Install a newer torch, e.g. pip install 'torch==2.13.0'")


try:  # metadata, not `import torch`: `import engine.config` (the launcher's fast config check) stays light
    check_torch_version(metadata.version("torch"))
except metadata.PackageNotFoundError:  # a source build without metadata: the import itself will tell
    pass


def from_pretrained(path, **kwargs):
    """A world-size-1 model from a Loom checkpoint or an HF directory; see engine/pretrained.py.

    Imported lazily so that ``import engine.config`` (the launcher's fast config check) stays light.
    """
    from engine.pretrained import from_pretrained as load

    return load(path, **kwargs)


__all__ = ["MIN_TORCH", "check_torch_version", "from_pretrained"]
