"""The collectives of one step, recorded without communicating, and where ranks disagree on them.

A rank that issues a different sequence of collectives from its peers (a different microbatch
count or shape, pipeline layout, MoE auxiliary tensor) does not fail: it hangs, or worse, pairs
a gradient with the wrong tensor. ``DryRun`` runs a step's code with every torch.distributed call
replaced by a local stand-in that gives outputs of the right shape (an all-gather tiles the
input, an all-to-all returns it, a receive gives zeros) and records each call as a ``Call``.
``first_disagreement`` then compares the ranks' records: every member of a group must issue the
same calls on it in the same order, and each send must meet a receive of the same shape.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Callable, Optional

import torch
import torch.distributed as dist

from loom.parallel.intercept import Interceptor, arguments, call_group, describe


class DryRunError(RuntimeError):
    pass


class DryRun(Interceptor):
    """Records every call (``.calls``, in order) and answers it locally; nothing crosses ranks."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def call(self, name: str, fn: Callable, args: tuple, kwargs: dict):
        self.calls += describe(name, fn, args, kwargs)
        bound = arguments(fn, args, kwargs)
        stand_in = _STAND_INS.get(name)
        if stand_in is None:
            raise DryRunError(f"torch.distributed.{name} has no dry-run stand-in; the pre-flight check "
                              "cannot record it (runtime.preflight=false skips the check)")
        stand_in(bound)
        if name == "batch_isend_irecv":
            return [_Done() for _ in bound["p2p_op_list"]]
        return _Done() if bound.get("async_op") else None


class _Done:
    """A completed handle."""

    def wait(self, *args, **kwargs) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _size(bound: dict) -> int:
    return dist.get_world_size(call_group(bound))


def _rank(bound: dict) -> int:
    return dist.get_rank(call_group(bound))


def _gather_into(bound: dict) -> None:
    out, x = bound["output_tensor"], bound["input_tensor"]
    out.view(_size(bound), -1).copy_(x.reshape(1, -1))


def _scatter_into(bound: dict) -> None:
    out, x = bound["output"], bound["input"]
    out.copy_(x.reshape(_size(bound), *out.shape)[_rank(bound)])


def _exchange(bound: dict) -> None:
    out, x = bound["output"], bound["input"]
    out.copy_(x) if out.shape == x.shape else out.zero_()


def _p2p(bound: dict) -> None:
    for op in bound["p2p_op_list"]:
        if op.op.__name__ != "isend":  # the function itself may be patched: compare names
            op.tensor.zero_()


def _nothing(bound: dict) -> None:
    pass


_STAND_INS: dict[str, Callable[[dict], None]] = {
    "all_reduce": _nothing, "broadcast": _nothing, "reduce": _nothing, "barrier": _nothing,
    "monitored_barrier": _nothing, "send": _nothing, "isend": _nothing,
    "recv": lambda b: b["tensor"].zero_(), "irecv": lambda b: b["tensor"].zero_(),
    "all_gather_into_tensor": _gather_into, "all_gather_single": _gather_into,
    "all_gather": lambda b: [t.copy_(b["tensor"]) for t in b["tensor_list"]],
    "reduce_scatter_tensor": _scatter_into, "reduce_scatter_single": _scatter_into,
    "reduce_scatter": lambda b: b["output"].copy_(b["input_list"][_rank(b)]),
    "all_to_all_single": _exchange,
    "all_to_all": lambda b: [o.copy_(i) if o.shape == i.shape else o.zero_()
                             for o, i in zip(b["output_tensor_list"], b["input_tensor_list"])],
    "all_gather_object": lambda b: b["object_list"].__setitem__(slice(None), [b["obj"]] * _size(b)),
    "batch_isend_irecv": _p2p,
}


# ----------------------------------------------------------------------------- comparing ranks


def digests(calls: list) -> dict[tuple, str]:
    """One digest per stream a rank takes part in: each group's collectives, each peer's sends and
    receives. Ranks exchange these (a few bytes each) and the full records only when they differ."""
    streams = defaultdict(list)
    for c in calls:
        key = ("p2p", "send" if c.sends else "recv", c.peer) if c.peer is not None else ("group", c.group)
        streams[key].append(c.signature()[1:] if c.peer is not None else c.signature())
    return {k: hashlib.sha1(repr(v).encode()).hexdigest() for k, v in streams.items()}


def streams_agree(by_rank: list[dict]) -> bool:
    """Whether every group's members hold the same digest and every send stream its receive's."""
    for rank, mine in enumerate(by_rank):
        for key, digest in mine.items():
            if key[0] == "group":
                if any(by_rank[r].get(key) != digest for r in key[1]):
                    return False
            else:
                _, side, peer = key
                other = by_rank[peer].get(("p2p", "recv" if side == "send" else "send", rank))
                if other != digest:
                    return False
    return True


def first_disagreement(calls_by_rank: list[list], group_name: Optional[Callable] = None) -> Optional[str]:
    """A message naming the earliest call on which ranks disagree, or None where they all agree."""
    name = group_name or (lambda ranks: f"ranks {list(ranks)}")
    found = []  # (position in the issuing rank's step, message)
    by_group = defaultdict(lambda: defaultdict(list))
    pairs = defaultdict(lambda: ([], []))  # (src, dst) -> (src's sends, dst's receives)
    for rank, calls in enumerate(calls_by_rank):
        for pos, c in enumerate(calls):
            if c.peer is None:
                by_group[c.group][rank].append((pos, c))
            else:
                src, dst = (rank, c.peer) if c.sends else (c.peer, rank)
                pairs[(src, dst)][0 if c.sends else 1].append((pos, c))
    for group, seqs in by_group.items():
        first = group[0]
        for other in group[1:]:
            diff = _first_difference(seqs[first], seqs[other], lambda c: c.signature())
            if diff is not None:
                i, pos, a, b = diff
                found.append((pos, f"collective #{i} on group {name(group)}: rank {first} issues {a}, "
                                   f"rank {other} issues {b}"))
                break
    for (src, dst), (sends, recvs) in pairs.items():
        diff = _first_difference(sends, recvs, lambda c: c.signature()[1:])
        if diff is not None:
            i, pos, a, b = diff
            found.append((pos, f"message #{i} from rank {src} to rank {dst}: rank {src} issues {a}, "
                               f"rank {dst} issues {b}"))
    return min(found)[1] if found else None


def _first_difference(xs: list, ys: list, key: Callable):
    """(index, position, description of x, of y) of the first index where the two records differ."""
    for i in range(max(len(xs), len(ys))):
        x, y = xs[i] if i < len(xs) else None, ys[i] if i < len(ys) else None
        if x is None or y is None or key(x[1]) != key(y[1]):
            pos = min(p for p in (x and x[0], y and y[0]) if p is not None)
            return i, pos, x[1] if x else "nothing", y[1] if y else "nothing"
    return None


def dry_step(run: Callable[[], None]) -> list:
    """The calls ``run`` makes, with the RNG as it was before (the real step draws the same numbers)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with DryRun() as dry:
            run()
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    return dry.calls
