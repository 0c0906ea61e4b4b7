"""Each step's batch of this rank, made ahead of time by a torch DataLoader in worker processes.

An item of the DataLoader is a whole step: this DP rank's microbatches of the global batch of
step ``k`` (images decoded, tensors collated), so reading, tokenizing and decoding overlap the
model's compute. The batch of a step is still a pure function of (seed, step): the items are
indexed by step, never drawn. ``StepLoader(step)`` serves steps in order from a prefetching
iterator; any other step (a resume, a pre-flight dry run, a tool) restarts the iterator there.
With ``num_workers=0`` the step is made in the calling process when asked for.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch.utils.data

from loom.data.multimodal import BadSampleError
from loom.data.sampler import GlobalBatchSampler, Microbatch


@dataclass
class StepBatch:
    """One DataLoader item: step ``step``'s microbatches of one DP rank, and the bad samples found
    while making them (a worker's own copy of the dataset cannot report them otherwise). ``error``: the
    message of a bad sample under ``on_bad_sample=error``, carried as data: the DataLoader would re-raise
    it with the worker's traceback pasted into the message."""

    step: int
    microbatches: list[Microbatch]
    bad_samples: list = field(default_factory=list)
    error: Optional[str] = None


class StepBatches(torch.utils.data.Dataset):
    """Map-style over steps: ``[k]`` is this rank's StepBatch of step k (any k >= 0)."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, dp_rank: int, dp_size: int, micro_batch_size: int):
        self.dataset, self.sampler = dataset, sampler
        self.share = (dp_rank, dp_size, micro_batch_size)

    def __getitem__(self, step: int) -> StepBatch:
        found = getattr(self.dataset, "bad_samples", [])
        before = len(found)
        try:
            mbs = self.dataset.microbatches(self.sampler.indices(step), *self.share)
        except BadSampleError as e:
            return StepBatch(int(step), [], list(found[before:]), error=str(e))
        return StepBatch(int(step), mbs, list(found[before:]))


def _as_is(item):
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM to the whole process group must reach only the training process, which
    finishes its step and saves: a worker killed by it would make the DataLoader raise mid-step. The
    workers exit when the loader closes, or when they see the training process gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StepLoader:
    """``loader(step)`` -> this rank's microbatches of ``step``; prefetched by ``num_workers`` processes,
    ``prefetch`` steps ahead each."""

    def __init__(self, steps: StepBatches, num_workers: int = 0, prefetch: int = 2):
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if prefetch < 1:
            raise ValueError(f"data.prefetch={prefetch} must be >= 1")
        self.steps, self.num_workers, self.prefetch = steps, int(num_workers), int(prefetch)
        self._iterator, self._next = None, None
        self._last: Optional[StepBatch] = None  # a pre-flight dry run and the first step ask for the same step
        self.restarts = 0

    def __call__(self, step: int) -> list[Microbatch]:
        step = int(step)
        if self._last is None or self._last.step != step:
            item = self._fetch(step)
            if item.step != step:
                raise RuntimeError(f"the data loader returned step {item.step} when step {step} was due")
            if item.bad_samples:
                self.steps.dataset.record_bad(item.bad_samples)
            if item.error is not None:
                raise BadSampleError(item.error)
            self._last = item
        return self._last.microbatches

    def _fetch(self, step: int) -> StepBatch:
        if self.num_workers == 0:
            return self.steps[step]
        if self._iterator is None or step != self._next:
            self._start(step)
        try:
            item = next(self._iterator)
        except BaseException:
            self.close()  # the next request starts afresh
            raise
        self._next = step + 1
        return item

    def _start(self, step: int) -> None:
        self.close()
        loader = torch.utils.data.DataLoader(self.steps, batch_size=None, sampler=range(step, sys.maxsize),
                                             num_workers=self.num_workers, prefetch_factor=self.prefetch,
                                             collate_fn=_as_is, worker_init_fn=_ignore_stop_signals)
        self._iterator, self._next = iter(loader), step
        self.restarts += 1

    def close(self) -> None:
        """Stop the workers (the iterator's finaliser joins them)."""
        self._iterator = None
