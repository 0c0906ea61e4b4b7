"""Every private torch API Loom uses, in one place, behind the minimum version it is known to exist in.

Private APIs move between releases without notice. Reaching them only through this module means
an upgrade that breaks one breaks here, by name, and the version check below runs before any of
them is used. Keep each wrapper thin: what it calls, and why the public API does not do.
"""
from __future__ import annotations

import functools
from datetime import timedelta

import torch
import torch.distributed as dist

from loom.version import check_torch_version

check_torch_version(torch.__version__)


def process_group_options(backend: str, timeout: timedelta):
    """``backend_override`` value for DeviceMesh: the backend with options carrying ``timeout``
    (the public API has no per-group timeout for mesh groups; they would get the 30-minute default)."""
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return backend
    opts._timeout = timeout
    return (backend, opts)


def flatten_mesh(mesh, name: str, backend_override):
    """One group over several mesh dims (``DeviceMesh._flatten``; there is no public equivalent)."""
    return mesh._flatten(name, backend_override=backend_override)


@functools.lru_cache(maxsize=None)
def grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` exists and runs for this device type and dtype (probed once).

    In torch 2.13 it runs on CPU in fp32/bf16; on CUDA it needs bf16 and a recent GPU.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        with torch.autocast(device_type, enabled=False):
            a = torch.ones(8, 8, device=device_type, dtype=dtype)
            b = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
            offs = torch.tensor([3, 8], device=device_type, dtype=torch.int32)
            out = grouped_mm(a, b, offs)
        return bool((out.float() == 8.0).all())
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [N, k]`` rows grouped by ``offs`` (int32 cumulative ends) times ``b [G, k, n]`` -> ``[N, n]``."""
    return torch._grouped_mm(a, b, offs)


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One 2-norm per tensor in few kernels (what ``clip_grad_norm_`` uses inside)."""
    return torch._foreach_norm(tensors)


def foreach_mul_(tensors: list[torch.Tensor], scalar: float) -> None:
    """Scale every tensor in place in few kernels."""
    torch._foreach_mul_(tensors, scalar)


def fake_process_group_store():
    """A store for torch's ``fake`` backend: every rank of any world size in one process, collectives
    no-ops (a dry run's process groups). A testing module of torch, hence here."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def configure_dynamo(recompile_limit: int, nested_graph_breaks: bool) -> None:
    """dynamo's process-wide knobs for compiled blocks (``torch._dynamo.config``; torch.compile takes no
    per-call value for either). ``recompile_limit`` only ever grows; ``nested_graph_breaks`` is set where
    this torch has it (resume a graph break in the frame where it happened, not in every caller)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, recompile_limit)
    if hasattr(config, "nested_graph_breaks"):
        config.nested_graph_breaks = nested_graph_breaks


def maybe_mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Trace ``tensor``'s size along ``dim`` as symbolic unless tracing pins it (no public equivalent)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
