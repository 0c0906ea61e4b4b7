"""What keeps a run alive, or ends it cleanly: a step watchdog and the preemption signal.

``StepWatchdog`` uses faulthandler's watchdog thread, which runs in C and so writes every Python
thread's stack even while the main thread is stuck inside a collective holding the GIL. Each rank
writes its own file, so a hang shows where every rank was, not only the one that timed out first.

``StopSignal`` turns SIGTERM (what SLURM and Kubernetes send before preemption) into a request to
stop at the end of the current step. Ranks may receive it at different moments, so the trainer
agrees on it with one all-reduced flag per step (as Megatron's exit-signal handler does) and every
rank saves the same step's checkpoint before exiting 0. A second SIGTERM is not caught.
"""
from __future__ import annotations

import faulthandler
import signal
import threading
from pathlib import Path
from typing import Optional


class StepWatchdog:
    """Within ``with``: ``arm()`` at each step's start, ``disarm()`` at its end; a step longer than
    ``timeout_s`` (0: off) writes every thread's stack to ``path``."""

    def __init__(self, timeout_s: float, path: Path):
        self.timeout_s, self.path = timeout_s, Path(path)
        self.file = None

    def __enter__(self):
        if self.timeout_s > 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
        return self

    def arm(self) -> None:
        if self.file is not None:
            faulthandler.dump_traceback_later(self.timeout_s, repeat=False, file=self.file)

    def disarm(self) -> None:
        if self.file is not None:
            faulthandler.cancel_dump_traceback_later()

    def __exit__(self, *exc):
        self.disarm()
        if self.file is not None:
            self.file.close()
            self.file = None


class StopSignal:
    """Within ``with`` (main thread only: elsewhere signals cannot be caught): ``requested`` turns true
    on the first SIGTERM; the second one gets its previous handler (by default: terminate)."""

    def __init__(self, rank: int = 0):
        self.requested = False
        self.rank = rank
        self._previous: Optional[object] = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop waiting for the step to end
            signal.signal(signal.SIGTERM, self._previous)
            signal.raise_signal(signal.SIGTERM)
            return
        self.requested = True
        print(f"rank {self.rank}: SIGTERM: every rank saves a checkpoint at the end of this step, then exits",
              flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
