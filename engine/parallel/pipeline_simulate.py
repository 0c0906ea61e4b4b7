"""Replay every pipeline rank's table against the others: deadlocks, mismatches, order, bubble.

The communication model is the strictest the executor meets (NCCL). Each rank has one queue
per process group (activations, gradients: ``DIRECTION``). A post step appends one batch to
each queue it touches, and a queue runs its batches one after another: a batch becomes active
when the one before it has completed, and completes when every op in it has met its
counterpart (the k-th send from rank a to rank b on a group meets b's k-th receive from a on
that group, and they must carry the same message) while both batches are active. A compute
step waits for the batch holding its input's receive; the run ends when every batch has
completed. Gloo posts each op on its own at once, which can only complete ops earlier, so a
table that passes here runs there too.

Times: a full-stage forward takes ``t_f`` and a full backward ``t_b`` (a chunk 1/vpp of
them); where a table splits the backward, W takes ``t_w`` of it and B the rest. p2p is free,
so the reports give each rank's busy time and finish time as the schedule alone makes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from loom.parallel.pipeline_schedule import (
    B, COMPUTE, DIRECTION, F, SEND_B, SEND_F, W, Action, ScheduleError, Step, Table, input_of, peer_of,
    splits_backward, stage_of,
)


@dataclass
class RankReport:
    in_flight: int = 0
    peak_in_flight: int = 0
    busy: float = 0.0
    end: float = 0.0


def _message(a: Action, rank: int, pp: int) -> tuple:
    """What travels: (kind, microbatch, source virtual stage, destination virtual stage)."""
    stage = stage_of(rank, a.chunk, pp)
    kind = DIRECTION[a.kind]
    if a.kind in (SEND_F, SEND_B):
        return (kind, a.mb, stage, stage + 1 if kind == F else stage - 1)
    return (kind, a.mb, stage - 1 if kind == F else stage + 1, stage)


@dataclass
class _Op:
    """One posted send or receive."""

    posted: float
    previous: Optional["_Op"] = None  # the op before it in its queue
    partner: Optional["_Op"] = None
    active: Optional[float] = None  # when it reached the head of its queue
    done: Optional[float] = None


class _Channel:
    """One direction of one group between two ranks: sends and receives matched in posting order."""

    def __init__(self):
        self.sends: list[tuple[tuple, _Op]] = []
        self.recvs: list[tuple[tuple, _Op]] = []

    def post(self, is_send: bool, message: tuple, op: _Op) -> None:
        mine, other = (self.sends, self.recvs) if is_send else (self.recvs, self.sends)
        mine.append((message, op))
        index = len(mine) - 1
        if index < len(other):
            if message != other[index][0]:
                raise ScheduleError(f"p2p mismatch: {message} is matched with {other[index][0]}")
            op.partner, other[index][1].partner = other[index][1], op


class _Replay:
    def __init__(self, tables: list[Table], t_f: float, t_b: float, t_w: float, queues: str, cost):
        self.tables, self.pp, self.queue_mode, self.cost = tables, len(tables), queues, cost
        self.vpp = 1 + max(step[0].chunk for table in tables for step in table)
        split = [splits_backward(t) for t in tables]
        self.t = [{F: t_f, B: t_b - t_w if s else t_b, W: t_w} for s in split]
        self.pos = [0] * self.pp
        self.clock = [0.0] * self.pp
        self.queues: list[dict[tuple, _Op]] = [{} for _ in range(self.pp)]  # queue -> its last op
        self.ops: list[list[_Op]] = [[] for _ in range(self.pp)]
        self.receives: list[dict[Action, _Op]] = [{} for _ in range(self.pp)]
        self.channels: dict[tuple, _Channel] = {}
        self.done: list[set] = [set() for _ in range(self.pp)]
        self.releases = [{(s[0].mb, s[0].chunk) for s in t if s[0].kind == W} for t in tables]
        self.reports = [RankReport() for _ in range(self.pp)]

    def run(self) -> list[RankReport]:
        while True:
            moved = any([self._advance(r) for r in range(self.pp)])
            moved = self._settle() or moved
            if all(self.pos[r] == len(self.tables[r]) for r in range(self.pp)) and self._drained():
                break
            if not moved:
                blocked = {r: self.tables[r][self.pos[r]] for r in range(self.pp) if self.pos[r] < len(self.tables[r])}
                raise ScheduleError(f"deadlock: every rank waits; blocked steps {blocked}")
        for r, report in enumerate(self.reports):
            report.end = max([self.clock[r], *(op.done for op in self.ops[r])])
        return self.reports

    def _drained(self) -> bool:
        return all(op.done is not None for ops in self.ops for op in ops)

    def _advance(self, r: int) -> bool:
        moved = False
        while self.pos[r] < len(self.tables[r]):
            step = self.tables[r][self.pos[r]]
            if step[0].kind in COMPUTE:
                if not self._compute(r, step[0]):
                    return moved
            else:
                self._post(r, step)
            self.pos[r] += 1
            moved = True
        return moved

    def _compute(self, r: int, a: Action) -> bool:
        """Run ``a`` once its input has arrived; False while it waits."""
        done, stage = self.done[r], stage_of(r, a.chunk, self.pp)
        first, last = stage == 0, stage == self.pp * self.vpp - 1
        needs = {F: [] if first else [input_of(a)], W: [Action(B, a.mb, a.chunk)],
                 B: [Action(F, a.mb, a.chunk)] + ([] if last else [input_of(a)])}[a.kind]
        missing = [n for n in needs if n not in done and n not in self.receives[r]]
        if missing or a in done:
            raise ScheduleError(f"rank {r}: {a} runs {'twice' if a in done else f'before {missing}'}")
        arrived = [self.receives[r][n].done for n in needs if n in self.receives[r]]
        if any(t is None for t in arrived):
            return False
        for n in needs:
            self.receives[r].pop(n, None)
            done.add(n)
        done.add(a)
        report = self.reports[r]
        releases = W if (a.mb, a.chunk) in self.releases[r] else B  # the step that frees the activations
        report.in_flight += 1 if a.kind == F else -1 if a.kind == releases else 0
        report.peak_in_flight = max(report.peak_in_flight, report.in_flight)
        duration = self.t[r][a.kind] / self.vpp if self.cost is None else self.cost(r, a)
        self.clock[r] = max([self.clock[r], *arrived]) + duration
        report.busy += duration
        return True

    def _post(self, r: int, step: Step) -> None:
        for a in step:
            source = {SEND_F: F, SEND_B: B}.get(a.kind)
            if source and Action(source, a.mb, a.chunk) not in self.done[r]:
                raise ScheduleError(f"rank {r}: {a} is posted before {source}{a.mb}.{a.chunk} computed it")
            is_send, direction, peer = source is not None, DIRECTION[a.kind], peer_of(a, r, self.pp)
            key = (r, peer, direction) if is_send else (peer, r, direction)
            queue = {"channel": key, "group": (direction,), "rank": ()}[self.queue_mode]
            op = _Op(self.clock[r], previous=self.queues[r].get(queue))
            self.queues[r][queue] = op
            self.ops[r].append(op)
            self.channels.setdefault(key, _Channel()).post(is_send, _message(a, r, self.pp), op)
            if is_send:
                self.done[r].add(a)
            else:
                if a in self.receives[r] or a in self.done[r]:
                    raise ScheduleError(f"rank {r}: {a} is posted twice")
                self.receives[r][a] = op

    def _settle(self) -> bool:
        """Resolve every op whose activation and completion times are now known."""
        moved, changed = False, True
        while changed:
            changed = False
            for op in (op for ops in self.ops for op in ops):
                if op.active is None and (op.previous is None or op.previous.done is not None):
                    op.active = max(op.posted, op.previous.done if op.previous is not None else op.posted)
                    changed = True
                if op.done is None and op.active is not None and op.partner is not None \
                        and op.partner.active is not None:
                    op.done = op.partner.done = max(op.active, op.partner.active)
                    changed = True
            moved = moved or changed
        return moved


def simulate(tables: list[Table], t_f: float = 1.0, t_b: float = 2.0, t_w: Optional[float] = None,
             queues: str = "channel", cost: Optional[Callable[[int, Action], float]] = None) -> list[RankReport]:
    """Replay all ranks' tables against each other; raise ScheduleError on any fault.

    Checks, besides deadlock and message matching: every F and B (and W, in a table that has
    W) of every (microbatch, chunk) runs exactly once, B after F and W after B, each after its
    input was received; every receive is posted before the compute that needs it; every send
    after the compute that produced it. ``t_w`` defaults to half the backward (B = W, as the
    zero-bubble paper assumes). ``cost(rank, action)``, if given, is each compute's duration
    instead (measured costs: tools/bench_pipeline.py). ``queues`` is the communication model:
    ``channel`` (the executor's: a group per link and direction), ``group`` (one group per
    direction for the whole pipeline) or ``rank`` (one group).
    """
    t_w = t_b / 2 if t_w is None else t_w
    if queues not in ("channel", "group", "rank"):
        raise ValueError(f"queues={queues!r}: expected channel, group or rank")
    reports = _Replay(tables, t_f, t_b, t_w, queues, cost).run()
    chunks = 1 + max(step[0].chunk for table in tables for step in table)
    m = 1 + max(step[0].mb for table in tables for step in table)
    for r, table in enumerate(tables):
        kinds = COMPUTE if splits_backward(table) else (F, B)
        ran = [step[0] for step in table if step[0].kind in COMPUTE]
        expected = {Action(k, i, c) for k in kinds for i in range(m) for c in range(chunks)}
        if sorted(ran, key=repr) != sorted(expected, key=repr):
            raise ScheduleError(f"rank {r} does not run every {'/'.join(kinds)} exactly once: {ran}")
    return reports


def bubble_fraction(reports: list[RankReport]) -> list[float]:
    """Each rank's idle share of the whole pipeline's run time."""
    span = max(r.end for r in reports)
    return [1.0 - r.busy / span for r in reports]


def idle_time(reports: list[RankReport]) -> list[float]:
    """Each rank's idle time within the whole pipeline's run (the bubble, in units of t_f)."""
    span = max(r.end for r in reports)
    return [span - r.busy for r in reports]
