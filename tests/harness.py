"""Run a function on N gloo ranks: spawn the workers once per test module, then reuse them.

Starting ranks is the main cost on 2 cores (each would import torch and the engine), so the
workers are forked from a forkserver that imported them once for the whole session (never from
the test process, whose threads a fork would copy half-way), and a ``World`` keeps its processes
alive and runs one task after another. Each task gets a fresh process group of the
size it asks for (over a new FileStore), so one world of 4 runs 1-, 2- and 4-rank layouts in turn.

A task fails, never hangs: a rank that raises sends its traceback back; a rank that dies or a
task that outlives its timeout tears the world down, and the next task respawns it.
"""
from __future__ import annotations

import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.multiprocessing as mp

PG_TIMEOUT_S = 90
PRELOAD = ["torch", "torch.distributed", "loom.train.trainer"]


class RankError(RuntimeError):
    pass


def _worker(rank: int, tasks, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    while True:
        item = tasks.get()
        if item is None:
            return
        fn, args, kwargs, world_size, store_path = item
        try:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=PG_TIMEOUT_S))
            try:
                out = fn(*args, **kwargs)
            finally:
                dist.destroy_process_group()
            results.put((rank, True, out))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((rank, False, traceback.format_exc()))


class World:
    """A pool of ``size`` spawned ranks. ``run(fn, nranks=k)`` runs ``fn`` on ranks 0..k-1."""

    def __init__(self, size: int):
        self.size = size
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.procs: list = []
        self._tmp = tempfile.TemporaryDirectory(prefix="loom_world_")
        self._n = 0

    def _start(self) -> None:
        self.results = self.ctx.Queue()
        self.tasks = [self.ctx.Queue() for _ in range(self.size)]
        self.procs = [self.ctx.Process(target=_worker, args=(r, self.tasks[r], self.results), daemon=True)
                      for r in range(self.size)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, *args, nranks: int | None = None, timeout: float = 300, **kwargs) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on ``nranks`` ranks; return the per-rank results in rank order."""
        nranks = nranks or self.size
        if nranks > self.size:
            raise ValueError(f"world has {self.size} ranks, task asks for {nranks}")
        if not self.procs:
            self._start()
        self._n += 1
        store = os.path.join(self._tmp.name, f"store_{self._n}")
        for r in range(nranks):
            self.tasks[r].put((fn, args, kwargs, nranks, store))
        return self._collect(nranks, timeout)

    def _collect(self, nranks: int, timeout: float) -> list[Any]:
        import time

        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < nranks:
            try:
                rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead:
                    self.shutdown()
                    raise RankError(f"rank(s) {dead} died")
                if time.monotonic() > deadline:
                    self.shutdown()
                    raise RankError(f"task timed out after {timeout}s; ranks done: {sorted(out)}")
                continue
            if not ok:
                errors = {rank: value, **self._more_errors(grace=3.0)}
                self.shutdown()  # the other ranks may be stuck in a collective with the failed one
                raise RankError("\n".join(f"rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())))
            out[rank] = value
        return [out[r] for r in range(nranks)]

    def _more_errors(self, grace: float) -> dict[int, str]:
        """A failing rank often makes its peers fail too; gather them all, the root cause included."""
        import time

        errors, deadline = {}, time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                rank, ok, value = self.results.get(timeout=0.2)
            except queue.Empty:
                continue
            if not ok:
                errors[rank] = value
        return errors

    def shutdown(self) -> None:
        for q in getattr(self, "tasks", []):
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
        self.procs = []

    def close(self) -> None:
        self.shutdown()
        self._tmp.cleanup()
