"""Pipeline schedules as per-rank tables, built by pure functions (no process group, no torch).

A table is the exact program one pipeline rank runs, a list of steps:
- a compute step ``(F(mb, chunk),)``, ``(B(mb, chunk),)`` or ``(W(mb, chunk),)``;
- a post step: the sends and receives posted together, without waiting for them.

``chunk`` is the rank-local model chunk. With ``vpp`` chunks per rank, rank ``r`` holds the
virtual stages ``r, r + pp, r + 2 pp, ...`` (Megatron's interleaved order), so chunk ``c`` of
rank ``r`` is virtual stage ``c * pp + r``, and activations flow rank 0 -> 1 -> ... -> pp-1 ->
0 (next chunk) -> ...

B and W: a schedule that lists W actions splits the backward (zero-bubble pipelines). B then
computes only the gradient of the stage input, which the previous stage waits for; W computes
the weight gradients later, when the rank would otherwise idle. Without W, B is the whole
backward.

A schedule gives the compute order; one rule, the same for every schedule, derives the
communication so that p2p overlaps compute. Before compute ``c[i]`` a rank posts the sends
``c[i-1]`` produced and the receives ``c[i+1]`` will need: a receive is in flight during the
compute before its consumer, a send during the computes after its producer. A compute waits
for its own input's receive only; sends are waited at the end of the run. Activations
(SEND_F / RECV_F) and gradients (SEND_B / RECV_B) travel on two process groups, because a
communicator runs its posted batches one after another (NCCL: one stream per communicator):
on a single one, a gradient receive posted ahead would queue in front of an activation send
that the peer needs first, and the pipeline would deadlock (pipeline_simulate.py replays the
tables under that model and proves them deadlock-free and correctly matched). Messages
between two ranks are matched purely by their order (all NCCL offers). The executor
(pipeline.py) runs any table without knowing its schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

F, B, W = "F", "B", "W"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, W)
# The process group each p2p action travels on: activations flow forward, gradients backward.
DIRECTION = {SEND_F: F, RECV_F: F, SEND_B: B, RECV_B: B}
SCHEDULES = ("1f1b", "interleaved", "gpipe", "zb1")


class ScheduleError(RuntimeError):
    """A table that would deadlock, mismatch messages, or run an action out of order."""


@dataclass(frozen=True)
class Action:
    kind: str  # F | B | W | SEND_F | RECV_F | SEND_B | RECV_B
    mb: int
    chunk: int = 0

    def __repr__(self) -> str:
        return f"{self.kind}{self.mb}.{self.chunk}"


Step = tuple  # tuple[Action, ...]: one compute action, or the p2p actions posted together
Table = list  # list[Step]


def is_compute(step: Step) -> bool:
    return step[0].kind in COMPUTE


# ----------------------------------------------------------------------------- compute orders
# An order is the list of compute actions one rank runs, in order.


def gpipe_order(pp: int, m: int, rank: int) -> list[Action]:
    """All forwards, then all backwards: the simple reference (m microbatches in flight)."""
    return [Action(F, i) for i in range(m)] + [Action(B, i) for i in range(m)]


def one_f_one_b_order(pp: int, m: int, rank: int) -> list[Action]:
    """PipeDream-flush 1F1B: pp - rank - 1 warmup forwards, then alternate, then drain."""
    forwards = [Action(F, i) for i in range(m)]
    backwards = [Action(B, i) for i in range(m)]
    return _one_f_one_b(forwards, backwards, warmup=min(pp - rank - 1, m))


def interleaved_order(pp: int, vpp: int, m: int, rank: int) -> list[Action]:
    """Megatron's interleaved 1F1B: microbatches go through the chunks in groups of pp.

    Needs ``m % pp == 0``. Warmup is 2 (pp - rank - 1) + (vpp - 1) pp virtual forwards.
    """
    if m % pp:
        raise ScheduleError(f"interleaved schedule needs the microbatch count {m} to be a multiple of pp={pp}")
    total = m * vpp
    forwards = [_virtual_action(k, pp, vpp, forward=True) for k in range(total)]
    backwards = [_virtual_action(k, pp, vpp, forward=False) for k in range(total)]
    return _one_f_one_b(forwards, backwards, warmup=min(total, 2 * (pp - rank - 1) + (vpp - 1) * pp))


def zb1_order(pp: int, m: int, rank: int) -> list[Action]:
    """ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", 2023): 1F1B with B and W apart.

    The forwards and input-gradient backwards run in 1F1B order, so a rank holds as many
    microbatches between F and B as under 1F1B. Rank ``r`` runs each W right after its B,
    except that it starts doing so only from microbatch ``r`` on: the later a stage, the more W
    passes it defers, which lets its B passes (the only backward work the previous stage waits
    for) run earlier, and the deferred W passes fill the idle time at the end. With F, B and W
    of equal cost the bubble is a third of 1F1B's; every rank holds at most ``pp`` microbatches
    between F and W, the most any 1F1B rank holds.
    """
    warmup = min(pp - rank - 1, m)
    order = [Action(F, i) for i in range(warmup)]
    deferred = 0
    for k in range(m):
        if warmup + k < m:
            order.append(Action(F, warmup + k))
        order.append(Action(B, k))
        if k >= rank:
            order.append(Action(W, deferred))
            deferred += 1
    return order + [Action(W, i) for i in range(deferred, m)]


def _virtual_action(k: int, pp: int, vpp: int, forward: bool) -> Action:
    """The k-th virtual microbatch: pp microbatches through chunk 0, the same pp through chunk 1, ..."""
    group, within = divmod(k, pp * vpp)
    chunk = within // pp
    if not forward:  # backward walks the chunks from the last one
        chunk = vpp - 1 - chunk
    return Action(F if forward else B, group * pp + within % pp, chunk)


def _one_f_one_b(forwards: list[Action], backwards: list[Action], warmup: int) -> list[Action]:
    """Warmup forwards, then (forward, backward) pairs, then the remaining backwards."""
    order = list(forwards[:warmup])
    for i, f in enumerate(forwards[warmup:]):
        order += [f, backwards[i]]
    return order + backwards[len(forwards) - warmup:]


def in_flight_bound(schedule: str, pp: int, vpp: int, m: int, rank: int) -> int:
    """Microbatches (times chunks) whose activations a rank may hold at once under ``schedule``:
    from F to B, or to W where the schedule splits the backward."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(pp - rank, m)
    if schedule == "zb1":
        return min(pp, m)
    return min(m * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)


def theoretical_bubble(schedule: str, pp: int, vpp: int, m: int) -> float:
    """Idle share of the run: (p-1)/(m+p-1) for 1F1B and GPipe, (p-1)/(v m + p - 1) interleaved.

    zb1, with F, B and W of equal cost (a full backward is 2 F): (p-1) F of idle time against
    1F1B's 3 (p-1) F, so (p-1)/(3m+p-1).
    """
    if schedule == "zb1":
        return (pp - 1) / (3 * m + pp - 1)
    v = vpp if schedule == "interleaved" else 1
    return (pp - 1) / (v * m + pp - 1)


# ----------------------------------------------------------------------------- tables


def stage_of(rank: int, chunk: int, pp: int) -> int:
    return chunk * pp + rank


def compute_order(schedule: str, pp: int, vpp: int, m: int, rank: int) -> list[Action]:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown pipeline schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "interleaved":
        return interleaved_order(pp, vpp, m, rank)
    if vpp != 1:
        raise ScheduleError(f"schedule {schedule!r} runs one chunk per rank, got vpp={vpp}")
    return {"1f1b": one_f_one_b_order, "gpipe": gpipe_order, "zb1": zb1_order}[schedule](pp, m, rank)


def build_table(schedule: str, pp: int, vpp: int, m: int, rank: int) -> Table:
    """The program of pipeline rank ``rank`` for ``m`` microbatches (compute plus p2p steps)."""
    return with_communication(compute_order(schedule, pp, vpp, m, rank), rank, pp, vpp)


def build_tables(schedule: str, pp: int, vpp: int, m: int) -> list[Table]:
    return [build_table(schedule, pp, vpp, m, rank) for rank in range(pp)]


def with_communication(order: list[Action], rank: int, pp: int, vpp: int, lookahead: int = 1) -> Table:
    """Insert post steps: before compute i, the sends of compute i-1 and the receives of compute
    i + ``lookahead`` (and, before the first, the receives of everything up to there)."""
    table: Table = []
    posted = 0  # receives of order[:posted] are posted
    for i, a in enumerate(order):
        batch = _sends_after(order[i - 1], rank, pp, vpp) if i else []
        upto = min(len(order), i + lookahead + 1)
        batch += [r for c in order[posted:upto] for r in _receive_for(c, rank, pp, vpp)]
        posted = max(posted, upto)
        if batch:
            table.append(tuple(batch))
        table.append((a,))
    last = _sends_after(order[-1], rank, pp, vpp) if order else []
    if last:
        table.append(tuple(last))
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


def input_of(a: Action) -> Action | None:
    """The receive a compute action consumes (None for W, which consumes none)."""
    return {F: Action(RECV_F, a.mb, a.chunk), B: Action(RECV_B, a.mb, a.chunk)}.get(a.kind)


def peer_of(a: Action, rank: int, pp: int) -> int:
    """The pipeline rank a p2p action talks to: forward data flows to rank + 1, gradients to rank - 1."""
    return (rank + 1) % pp if a.kind in (SEND_F, RECV_B) else (rank - 1) % pp


def splits_backward(table: Table) -> bool:
    """Whether the table runs W passes (B computes input gradients only)."""
    return any(step[0].kind == W for step in table)


def last_weight_steps(table: Table) -> dict[int, int]:
    """Step index of each chunk's last weight-gradient step, W or else B (its gradients are then final)."""
    kind = W if splits_backward(table) else B
    return {step[0].chunk: i for i, step in enumerate(table) if step[0].kind == kind}
