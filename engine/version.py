"""The torch versions Loom supports. Torch-free, so ``import loom.config`` stays light."""
from __future__ import annotations

import re

# The oldest torch with every distributed API Loom calls: DeviceMesh groups built with per-group
# options (``backend_override`` on ``init_device_mesh`` and ``_flatten``) and ``P2POp(group_peer=)``.
# setup.py reads this line; the suite runs on torch 2.13. engine/compat.py holds those private APIs.
MIN_TORCH = "2.9"


def check_torch_version(version: str) -> None:
    """Raise ImportError if ``version`` (a torch version string) is older than MIN_TORCH."""
    found = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if found < tuple(int(x) for x in MIN_TORCH.split(".")):
        raise ImportError(f"Loom needs torch>={MIN_TORCH} (DeviceMesh backend_override, P2POp group_peer); "
                          f"found torch {version}. Install a newer torch, e.g. pip install 'torch==2.13.0'")
