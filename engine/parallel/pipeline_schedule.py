"""Pipeline schedules as per-rank tables, built by pure functions (no process group, no torch).

A table is the exact program one pipeline rank runs, a list of steps:
- a compute step ``(F(mb, chunk),)`` or ``(B(mb, chunk),)``;
- a communication step: the sends and receives posted together in one ``batch_isend_irecv``.

``chunk`` is the rank-local model chunk. With ``vpp`` chunks per rank, rank ``r`` holds the
virtual stages ``r, r + pp, r + 2 pp, ...`` (Megatron's interleaved order), so chunk ``c`` of
rank ``r`` is virtual stage ``c * pp + r``, and activations flow rank 0 -> 1 -> ... -> pp-1 ->
0 (next chunk) -> ...

A schedule gives the compute order as units (compute actions run back to back), and one rule,
the same for every schedule, derives the communication: between two units, post the sends the
first produced together with the receives the second needs, as Megatron does. Messages
between two ranks are matched purely by their order (all NCCL offers), so ``simulate``
replays the tables of all ranks against each other and proves them deadlock-free and
correctly matched; the executor (pipeline.py) runs any table without knowing its schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

F, B = "F", "B"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B)
SCHEDULES = ("1f1b", "interleaved", "gpipe")


class ScheduleError(RuntimeError):
    """A table that would deadlock, mismatch messages, or run an action out of order."""


@dataclass(frozen=True)
class Action:
    kind: str  # F | B | SEND_F | RECV_F | SEND_B | RECV_B
    mb: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}.{self.chunk}"


Step = tuple  # tuple[Action, ...]: one compute action, or the p2p actions posted together
Table = list  # list[Step]


# ----------------------------------------------------------------------------- compute orders
# An order is a list of units, each a list of compute actions run back to back; the p2p batch
# between two units carries the first unit's sends and the second unit's receives.


def gpipe_order(pp: int, m: int, rank: int) -> list[list[Action]]:
    """All forwards, then all backwards: the simple reference (m microbatches in flight)."""
    return [[Action(F, i)] for i in range(m)] + [[Action(B, i)] for i in range(m)]


def one_f_one_b_order(pp: int, m: int, rank: int) -> list[list[Action]]:
    """PipeDream-flush 1F1B: pp - rank - 1 warmup forwards, then alternate, then drain.

    Each compute is its own unit, so a forward's output leaves at once with the receive of the
    gradient the following backward needs (Megatron's send_forward_recv_backward).
    """
    forwards = [Action(F, i) for i in range(m)]
    backwards = [Action(B, i) for i in range(m)]
    order = _one_f_one_b(forwards, backwards, warmup=min(pp - rank - 1, m))
    return [[a] for unit in order for a in unit]


def interleaved_order(pp: int, vpp: int, m: int, rank: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B: microbatches go through the chunks in groups of pp.

    Needs ``m % pp == 0``. Warmup is 2 (pp - rank - 1) + (vpp - 1) pp virtual forwards. In the
    steady state a forward and a backward form one unit, so both their outputs leave in one
    batch with both receives of the next unit (Megatron's send_forward_backward_recv_forward_
    backward); splitting them, a rank blocks on sending a gradient to a peer that is itself
    blocked sending, and the tables deadlock (``simulate`` finds it).
    """
    if m % pp:
        raise ScheduleError(f"interleaved schedule needs the microbatch count {m} to be a multiple of pp={pp}")
    total = m * vpp
    forwards = [_virtual_action(k, pp, vpp, forward=True) for k in range(total)]
    backwards = [_virtual_action(k, pp, vpp, forward=False) for k in range(total)]
    return _one_f_one_b(forwards, backwards, warmup=min(total, 2 * (pp - rank - 1) + (vpp - 1) * pp))


def _virtual_action(k: int, pp: int, vpp: int, forward: bool) -> Action:
    """The k-th virtual microbatch: pp microbatches through chunk 0, the same pp through chunk 1, ..."""
    group, within = divmod(k, pp * vpp)
    chunk = within // pp
    if not forward:  # backward walks the chunks from the last one
        chunk = vpp - 1 - chunk
    return Action(F if forward else B, group * pp + within % pp, chunk)


def _one_f_one_b(forwards: list[Action], backwards: list[Action], warmup: int) -> list[list[Action]]:
    """Warmup forwards, then (forward, backward) pairs, then the remaining backwards."""
    units = [[f] for f in forwards[:warmup]]
    units += [[f, backwards[i]] for i, f in enumerate(forwards[warmup:])]
    return units + [[b] for b in backwards[len(forwards) - warmup:]]


def in_flight_bound(schedule: str, pp: int, vpp: int, m: int, rank: int) -> int:
    """Microbatches (times chunks) whose activations a rank may hold at once under ``schedule``."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(pp - rank, m)
    return min(m * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)


# ----------------------------------------------------------------------------- tables


def stage_of(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def build_table(schedule: str, pp: int, vpp: int, m: int, rank: int) -> Table:
    """The program of pipeline rank ``rank`` for ``m`` microbatches (compute plus p2p steps)."""
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved":
        order = interleaved_order(pp, vpp, m, rank)
    elif vpp != 1:
        raise ScheduleError(f"schedule {schedule!r} runs one chunk per rank, got vpp={vpp}")
    else:
        order = (one_f_one_b_order if schedule == "1f1b" else gpipe_order)(pp, m, rank)
    return with_communication(order, rank, pp, vpp)


def build_tables(schedule: str, pp: int, vpp: int, m: int) -> list[Table]:
    return [build_table(schedule, pp, vpp, m, rank) for rank in range(pp)]


def with_communication(order: list[list[Action]], rank: int, pp: int, vpp: int) -> Table:
    """Insert p2p steps: each unit's sends go out together with the next unit's receives."""
    table: Table = []
    pending: list[Action] = []
    for unit in order:
        batch = pending + [r for a in unit for r in _receive_for(a, rank, pp, vpp)]
        if batch:
            table.append(tuple(batch))
        table += [(a,) for a in unit]
        pending = [s for a in unit for s in _sends_after(a, rank, pp, vpp)]
    if pending:
        table.append(tuple(pending))
    return table


def _receive_for(a: Action, rank: int, pp: int, vpp: int) -> list[Action]:
    stage = stage_of(rank, a.chunk, pp)
    if a.kind == F and stage > 0:
        return [Action(RECV_F, a.mb, a.chunk)]
    if a.kind == B and stage < pp * vpp - 1:
        return [Action(RECV_B, a.mb, a.chunk)]
    return []


def _sends_after(a: Action, rank: int, pp: int, vpp: int) -> list[Action]:
    stage = stage_of(rank, a.chunk, pp)
    if a.kind == F and stage < pp * vpp - 1:
        return [Action(SEND_F, a.mb, a.chunk)]
    if a.kind == B and stage > 0:
        return [Action(SEND_B, a.mb, a.chunk)]
    return []


def peer_of(a: Action, rank: int, pp: int) -> int:
    """The pipeline rank a p2p action talks to: forward data flows to rank + 1, gradients to rank - 1."""
    return (rank + 1) % pp if a.kind in (SEND_F, RECV_B) else (rank - 1) % pp


def last_backward_steps(table: Table) -> dict[int, int]:
    """Step index of each chunk's last backward (when its gradients are final)."""
    return {step[0].chunk: i for i, step in enumerate(table) if step[0].kind == B}


# ----------------------------------------------------------------------------- simulation


@dataclass
class RankReport:
    in_flight: int = 0
    peak_in_flight: int = 0
    busy: float = 0.0
    end: float = 0.0


def _message(a: Action, rank: int, pp: int) -> tuple:
    """What travels: (kind, microbatch, source virtual stage, destination virtual stage)."""
    stage = stage_of(rank, a.chunk, pp)
    if a.kind == SEND_F:
        return (F, a.mb, stage, stage + 1)
    if a.kind == RECV_F:
        return (F, a.mb, stage - 1, stage)
    if a.kind == SEND_B:
        return (B, a.mb, stage, stage - 1)
    return (B, a.mb, stage + 1, stage)


class _Channel:
    """The messages from one rank to another, matched strictly in posting order."""

    def __init__(self):
        self.sends: list[tuple[tuple, float]] = []  # (message, post time)
        self.recvs: list[tuple[tuple, float]] = []

    def post(self, is_send: bool, message: tuple, t: float) -> int:
        side = self.sends if is_send else self.recvs
        side.append((message, t))
        return len(side) - 1

    def matched_at(self, is_send: bool, index: int) -> Optional[float]:
        """When the op at ``index`` completes (both sides posted), or None while it waits."""
        other = self.recvs if is_send else self.sends
        if index >= len(other):
            return None
        mine = (self.sends if is_send else self.recvs)[index]
        if mine[0] != other[index][0]:
            raise ScheduleError(f"p2p mismatch: {mine[0]} is matched with {other[index][0]}")
        return max(mine[1], other[index][1])


class _Replay:
    """Replays every rank's table in timed lock-step; compute of chunk c takes t_f / t_b."""

    def __init__(self, tables: list[Table], pp: int, t_f: float, t_b: float):
        self.tables, self.pp, self.t = tables, pp, {F: t_f, B: t_b}
        self.vpp = 1 + max(step[0].chunk for table in tables for step in table)
        self.pos = [0] * pp
        self.clock = [0.0] * pp
        self.posted: list[Optional[list]] = [None] * pp
        self.channels: dict[tuple[int, int], _Channel] = {}
        self.done: list[set] = [set() for _ in range(pp)]
        self.reports = [RankReport() for _ in range(pp)]

    def run(self) -> list[RankReport]:
        while any(self.pos[r] < len(self.tables[r]) for r in range(self.pp)):
            if not any([self._advance(r) for r in range(self.pp)]):
                blocked = {r: self.tables[r][self.pos[r]] for r in range(self.pp) if self.pos[r] < len(self.tables[r])}
                raise ScheduleError(f"deadlock: every rank waits; blocked steps {blocked}")
        for r, report in enumerate(self.reports):
            report.end = self.clock[r]
        return self.reports

    def _advance(self, r: int) -> bool:
        moved = False
        while self.pos[r] < len(self.tables[r]):
            step = self.tables[r][self.pos[r]]
            if step[0].kind in COMPUTE:
                self._compute(r, step[0])
            elif not self._communicate(r, step):
                return moved
            self.pos[r] += 1
            moved = True
        return moved

    def _compute(self, r: int, a: Action) -> None:
        done, stage = self.done[r], stage_of(r, a.chunk, self.pp)
        needs = []
        if a.kind == F and stage > 0:
            needs.append(Action(RECV_F, a.mb, a.chunk))
        if a.kind == B:
            needs.append(Action(F, a.mb, a.chunk))
            if stage < self.pp * self.vpp - 1:
                needs.append(Action(RECV_B, a.mb, a.chunk))
        missing = [n for n in needs if n not in done]
        if missing or a in done:
            raise ScheduleError(f"rank {r}: {a} runs {'twice' if a in done else f'before {missing}'}")
        done.add(a)
        report = self.reports[r]
        report.in_flight += 1 if a.kind == F else -1
        report.peak_in_flight = max(report.peak_in_flight, report.in_flight)
        duration = self.t[a.kind] / self.vpp
        self.clock[r] += duration
        report.busy += duration

    def _communicate(self, r: int, step: Step) -> bool:
        """Post the batch once; return True when every op in it has been matched."""
        if self.posted[r] is None:
            self.posted[r] = [self._post(r, a) for a in step]
        times = [self.channels[key].matched_at(is_send, i) for key, is_send, i in self.posted[r]]
        if any(t is None for t in times):
            return False
        self.clock[r] = max([self.clock[r], *times])
        self.posted[r] = None
        for a in step:
            self._check_send_ready(r, a)
            self.done[r].add(a)
        return True

    def _post(self, r: int, a: Action) -> tuple:
        is_send = a.kind in (SEND_F, SEND_B)
        peer = peer_of(a, r, self.pp)
        key = (r, peer) if is_send else (peer, r)
        self._check_send_ready(r, a)
        channel = self.channels.setdefault(key, _Channel())
        return key, is_send, channel.post(is_send, _message(a, r, self.pp), self.clock[r])

    def _check_send_ready(self, r: int, a: Action) -> None:
        source = {SEND_F: F, SEND_B: B}.get(a.kind)
        if source and Action(source, a.mb, a.chunk) not in self.done[r]:
            raise ScheduleError(f"rank {r}: {a} is posted before {source}{a.mb}.{a.chunk} computed it")


def simulate(tables: list[Table], t_f: float = 1.0, t_b: float = 2.0) -> list[RankReport]:
    """Replay all ranks' tables against each other; raise ScheduleError on any fault.

    Model: a p2p batch posts all its ops at once and completes when each has met its
    counterpart (the k-th send from rank a to rank b meets b's k-th receive from a, and they
    must carry the same message); a rank blocks on its batch until then. Checks that every
    F/B of every (microbatch, chunk) runs exactly once, forward before backward, after its
    input arrived. Times: a full-stage forward takes ``t_f`` and backward ``t_b`` (a chunk
    1/vpp of that), p2p is free; the reports give each rank's busy time and finish time.
    """
    pp = len(tables)
    reports = _Replay(tables, pp, t_f, t_b).run()
    chunks = 1 + max(step[0].chunk for table in tables for step in table)
    m = 1 + max(step[0].mb for table in tables for step in table)
    for r, table in enumerate(tables):
        ran = [step[0] for step in table if step[0].kind in COMPUTE]
        expected = {Action(k, i, c) for k in COMPUTE for i in range(m) for c in range(chunks)}
        if sorted(ran, key=repr) != sorted(expected, key=repr):
            raise ScheduleError(f"rank {r} does not run every F and B exactly once: {ran}")
    return reports


def bubble_fraction(reports: list[RankReport]) -> list[float]:
    """Each rank's idle share of the whole pipeline's run time."""
    span = max(r.end for r in reports)
    return [1.0 - r.busy / span for r in reports]


def theoretical_bubble(schedule: str, pp: int, vpp: int, m: int) -> float:
    """(p-1)/(m+p-1) for 1F1B and GPipe, (p-1)/(v m + p - 1) interleaved."""
    v = vpp if schedule == "interleaved" else 1
    return (pp - 1) / (v * m + pp - 1)
