"""The rank layout of every group: Megatron order, tp fastest, then cp, dp, pp."""
import pytest
import torch

from loom.parallel.mesh import ParallelDims, group_layout

DIMS16 = ParallelDims(tp=2, cp=2, dp=2, pp=2)

# Pinned by hand for world size 16 with tp=2, cp=2, pp=2, dp=2.
EXPECTED16 = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    "cp": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
    "dp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
    "pp": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
    "dp_cp": [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]],
    "tp_cp": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
    "mp": [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]],
}


def test_group_layout_world16_is_pinned():
    assert group_layout(DIMS16) == EXPECTED16


def _mine(layout, rank):
    return {name: next(g for g in groups if rank in g) for name, groups in layout.items()}


def test_device_mesh_builds_the_pinned_groups_on_every_rank():
    """Each of the 16 ranks builds its DeviceMesh (fake backend, one process) and gets the pinned groups."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from loom.parallel.mesh import ParallelGroups

    for rank in range(16):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=16)
        try:
            groups = ParallelGroups(DIMS16, device=torch.device("cpu"))
            got = {name: groups.ranks(name) for name in EXPECTED16}
            assert got == _mine(EXPECTED16, rank), f"rank {rank}"
            coords = (groups.pp_rank, groups.dp_rank, groups.cp_rank, groups.tp_rank)
            assert rank == ((coords[0] * 2 + coords[1]) * 2 + coords[2]) * 2 + coords[3]
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("dims", [ParallelDims(tp=4), ParallelDims(dp=3, tp=2), ParallelDims(pp=2, cp=3)])
def test_layout_partitions_the_world(dims):
    for name, groups in group_layout(dims).items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(dims.world_size)), name


def test_groups_need_matching_world_size():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from loom.parallel.mesh import ParallelGroups

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        with pytest.raises(ValueError, match="world size 4 != tp\\*cp\\*dp\\*pp = 8"):
            ParallelGroups(ParallelDims(tp=2, dp=4))
    finally:
        dist.destroy_process_group()
