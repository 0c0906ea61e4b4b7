"""Faults injected on purpose, to prove what Loom does when a rank dies, stalls, is preempted or disagrees.

``LOOM_FAULT`` holds ``;``-separated faults, each ``kind:key=value,...``; ``rank`` (global) is required:

    kill:rank=1,step=5            SIGKILL at the start of step 5 (1-based, as logged)
    kill:rank=1,step=4,at=save    SIGKILL inside step 4's checkpoint save, after this rank's files
                                  are written and before the checkpoint is marked complete
    term:rank=1,step=3            SIGTERM to itself at the start of step 3 (a scheduler's preemption)
    stall:rank=1,step=2,seconds=30[,call=0]
                                  sleep before the ``call``-th collective of step 2
    override:rank=1,train.micro_batch_size=2
                                  a config override on that rank only

A fault fires on the first attempt only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` = 0), so a job
restarted by ``--max-restarts`` runs clean. Nothing here runs unless the variable is set.
"""
from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass, field

KINDS = ("kill", "term", "stall", "override")
_step = 0  # the step this process is on, as the trainer announces it


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    options: dict = field(default_factory=dict)

    def matches(self, kind: str, rank: int, step=None, **where) -> bool:
        if self.kind != kind or self.rank != rank:
            return False
        if step is not None and int(self.options.get("step", -1)) != step:
            return False
        return all(str(self.options.get(k, v)) == str(v) for k, v in where.items())


@functools.lru_cache(maxsize=8)
def parse(text: str) -> tuple[Fault, ...]:
    faults = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        kind, _, rest = item.partition(":")
        options = dict(pair.split("=", 1) for pair in rest.split(",") if pair)
        if kind not in KINDS or "rank" not in options:
            raise ValueError(f"LOOM_FAULT entry {item!r}: expected kind:rank=R,... with kind one of {KINDS}")
        faults.append(Fault(kind, int(options.pop("rank")), options))
    return tuple(faults)


def active() -> tuple[Fault, ...]:
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return ()
    return parse(os.environ.get("LOOM_FAULT", ""))


def config_overrides(rank: int) -> list[str]:
    """``a.b=value`` overrides this rank gets on top of the command line's."""
    return [f"{k}={v}" for f in active() if f.matches("override", rank) for k, v in f.options.items()]


def at_step(rank: int, step: int) -> None:
    """Called at the start of every step (1-based): kill or preempt this rank if asked to."""
    global _step
    _step = step
    for f in active():
        if f.matches("kill", rank, step, at="start"):
            os.kill(os.getpid(), signal.SIGKILL)
        if f.matches("term", rank, step):
            os.kill(os.getpid(), signal.SIGTERM)


def in_save(rank: int) -> None:
    """Called inside a checkpoint save, between this rank's files and the completion marker."""
    if any(f.matches("kill", rank, _step, at="save") for f in active()):
        os.kill(os.getpid(), signal.SIGKILL)


def before_collective(rank: int, index: int) -> None:
    """Called before the ``index``-th collective of the current step."""
    for f in active():
        if f.matches("stall", rank, _step) and int(f.options.get("call", 0)) == index:
            time.sleep(float(f.options.get("seconds", 60)))
