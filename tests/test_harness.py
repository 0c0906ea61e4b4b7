"""The multi-rank harness fails fast, never hangs, when a rank raises, dies or stalls."""
import os
import time

import pytest

from tests.harness import RankError, World


def _ranks_and_sum():
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return dist.get_rank(), dist.get_world_size(), float(x)


def _rank1_raises():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a peer that never comes


def _rank1_dies():
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def _stall():
    time.sleep(60)


@pytest.fixture(scope="module")
def world():
    w = World(2)
    yield w
    w.close()


def test_runs_on_requested_ranks(world):
    assert world.run(_ranks_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]
    assert world.run(_ranks_and_sum, nranks=1) == [(0, 1, 1.0)]


def test_rank_that_raises_fails_the_task(world):
    start = time.monotonic()
    with pytest.raises(RankError, match="boom on rank 1"):
        world.run(_rank1_raises, timeout=60)
    assert time.monotonic() - start < 30
    assert world.run(_ranks_and_sum) == [(0, 2, 3.0), (1, 2, 3.0)]  # the world respawns


@pytest.mark.slow  # respawns the world; the raising case above covers the fast tier
def test_rank_that_dies_fails_the_task(world):
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank\(s\) \[1\] died|rank 0 raised"):  # gloo may notice first
        world.run(_rank1_dies, timeout=60)
    assert time.monotonic() - start < 30


@pytest.mark.slow  # waits out its timeout, then respawns the world
def test_stalled_task_times_out(world):
    with pytest.raises(RankError, match="timed out"):
        world.run(_stall, timeout=3)
