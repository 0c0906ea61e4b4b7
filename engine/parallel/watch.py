"""A collective that fails says which one: the call, its group, this rank and the step.

Every process group carries ``runtime.collective_timeout_s``. When a peer stalls or dies, gloo
raises from deep in its transport ("Timed out waiting 5000ms for recv operation", "Connection
closed by peer"), which says nothing about what the job was doing. While a ``CollectiveWatch`` is
active, such an error, raised by the call or by waiting on its handle, becomes a
``CollectiveError`` that names the call (function, shape, dtype), the group by Loom's name
(``dp_cp``, ``tp``, ...) with its ranks, and the step.

On CUDA, NCCL's watchdog thread aborts a timed-out collective itself; its report names the op
and the group's description, which DeviceMesh sets to ``mesh_<dim>`` for Loom's groups.
"""
from __future__ import annotations

import re
from typing import Callable

import torch.distributed as dist

import loom.faults as faults
from loom.parallel.intercept import Interceptor, describe

_TIMEOUT = re.compile(r"time[d ]?\s*out", re.IGNORECASE)


class CollectiveError(RuntimeError):
    """A collective or point-to-point call failed or timed out; the message names it."""


class CollectiveWatch(Interceptor):
    """Names failing collectives (see the module docstring) and counts the calls of each step.

    ``name_of(group)`` gives a group's name; ``timeout_s`` is quoted in timeout messages.
    """

    def __init__(self, rank: int, name_of: Callable, timeout_s: float):
        super().__init__()
        self.rank, self.name_of, self.timeout_s = rank, name_of, timeout_s
        self.step, self.index = 0, 0

    def begin_step(self, step: int) -> None:
        """Step ``step`` (1-based, as logged) starts: messages quote it, and calls count from 0."""
        self.step, self.index = step, 0

    def call(self, name: str, fn: Callable, args: tuple, kwargs: dict):
        index, self.index = self.index, self.index + 1
        faults.before_collective(self.rank, index)
        explain = _Explainer(self, name, fn, args, kwargs)
        try:
            result = fn(*args, **kwargs)
        except RuntimeError as e:
            raise CollectiveError(explain(e)) from e
        if isinstance(result, list):
            return [_WatchedWork(w, explain) if isinstance(w, dist.Work) else w for w in result]
        return _WatchedWork(result, explain) if isinstance(result, dist.Work) else result


class _Explainer:
    """Builds the message lazily: describing a call costs more than making most of them."""

    def __init__(self, watch: CollectiveWatch, name: str, fn: Callable, args: tuple, kwargs: dict):
        self.watch, self.name, self.fn, self.args, self.kwargs = watch, name, fn, args, kwargs
        self.step, self.index = watch.step, watch.index - 1

    def __call__(self, error: Exception) -> str:
        w = self.watch
        calls = describe(self.name, self.fn, self.args, self.kwargs)
        group = self.kwargs.get("group") or next((a for a in self.args if isinstance(a, dist.ProcessGroup)), None)
        if group is None and calls[0].peer is None:
            group = dist.group.WORLD
        where = (f"group {w.name_of(group)} (ranks {list(calls[0].group)})" if group is not None
                 else f"ranks {sorted({r for c in calls for r in c.group})}")
        what = "; ".join(map(str, calls))
        cause = (f"did not complete within runtime.collective_timeout_s={w.timeout_s:g}: a rank of the group is "
                 f"stalled or dead" if _TIMEOUT.search(str(error)) else "failed")
        step = f"step {self.step}" if self.step else "before the first step"
        return (f"rank {w.rank}: {what} on {where}, call {self.index} of {step}, {cause} "
                f"({type(error).__name__}: {str(error).strip()[:300]})")


class _WatchedWork:
    """A handle whose ``wait`` names its collective when it fails; everything else goes to the handle."""

    def __init__(self, work, explain: _Explainer):
        self._work, self._explain = work, explain

    def wait(self, *args, **kwargs):
        try:
            return self._work.wait(*args, **kwargs)
        except RuntimeError as e:
            raise CollectiveError(self._explain(e)) from e

    def __getattr__(self, name):
        return getattr(self._work, name)
