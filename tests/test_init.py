"""Initial weights: a pure function of (seed, name, global position), so any layout starts alike."""
import itertools

import pytest
import torch

from loom.model.init import BLOCK_NUMEL, block_rows, fill_shard, normal
from loom.parallel.index import flat_boxes


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 10), (5,), (BLOCK_NUMEL // 16 + 3, 16)])
def test_shards_assemble_the_whole_tensor(shape):
    """Every split of every dim (as TP, EP and ETP cut a weight) fills exactly its part of the tensor."""
    whole = fill_shard(torch.empty(shape), normal(0.02), 7, "w", shape, (0,) * len(shape))
    for dim, parts in itertools.product(range(len(shape)), (2, 3)):
        if shape[dim] % parts:
            continue
        size = shape[dim] // parts
        for i in range(parts):
            local_shape = tuple(size if d == dim else n for d, n in enumerate(shape))
            offsets = tuple(i * size if d == dim else 0 for d in range(len(shape)))
            shard = fill_shard(torch.empty(local_shape), normal(0.02), 7, "w", shape, offsets)
            assert torch.equal(shard, whole.narrow(dim, i * size, size)), (dim, parts, i)


def test_names_and_seeds_give_other_weights():
    shape = (8, 8)
    a = fill_shard(torch.empty(shape), normal(1.0), 7, "a", shape, (0, 0))
    assert not torch.equal(a, fill_shard(torch.empty(shape), normal(1.0), 7, "b", shape, (0, 0)))
    assert not torch.equal(a, fill_shard(torch.empty(shape), normal(1.0), 8, "a", shape, (0, 0)))
    assert 0.5 < a.std() < 1.5


def test_blocks_bound_the_peak():
    """A block is at most BLOCK_NUMEL elements, or one row (an expert of a stacked weight) if a row is larger."""
    assert block_rows((10**6, 4096)) * 4096 <= BLOCK_NUMEL
    assert block_rows((256, 2048, 7168)) == 1


def test_flat_boxes_cover_any_slice_exactly():
    torch.manual_seed(0)
    for shape in [(7,), (3, 5), (2, 3, 4), (4, 1, 6)]:
        n = torch.Size(shape).numel()
        x = torch.arange(n).view(shape)
        for lo in range(n + 1):
            for hi in range(lo, n + 1):
                got = []
                for offsets, sizes, start, end in flat_boxes(shape, lo, hi):
                    box = x[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
                    assert box.reshape(-1).tolist() == list(range(start, end))
                    got += list(range(start, end))
                assert got == list(range(lo, hi)), (shape, lo, hi)
                assert len(flat_boxes(shape, lo, hi)) <= 2 * len(shape) - 1


CONFIGS = {"dense": "launch/configs/tiny_dense.yaml", "moe": "launch/configs/tiny_moe.yaml"}
LAYOUTS = [("dense", ["parallel.tp=2", "parallel.pp=2", "model.tie_embeddings=true"]),
           ("dense", ["parallel.tp=4", "parallel.sp=true", "model.num_kv_heads=4"]),
           ("moe", ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]),
           ("moe", ["parallel.ep=4", "parallel.etp=1"])]


def _initial(config, overrides):
    import os

    from loom.config import load_config
    from loom.parallel.inspect import full_state_dict
    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, config), ["train.run_dir=runs/test_init", *overrides])
    groups = build_groups(cfg)
    full = full_state_dict(Trainer(cfg, groups).model, groups)
    groups.destroy()
    return full


@pytest.mark.parametrize("kind,overrides", [
    LAYOUTS[0], pytest.param(*LAYOUTS[1], marks=pytest.mark.slow), pytest.param(*LAYOUTS[2], marks=pytest.mark.slow),
    pytest.param(*LAYOUTS[3], marks=pytest.mark.slow)], ids=["tp2pp2_tied", "tp4_sp", "ep2_tp2", "ep4_etp1"])
def test_initial_weights_identical_across_layouts(world4, kind, overrides):
    """Gathered at full shape, every initial weight equals world size 1's, bit for bit."""
    model = [o for o in overrides if o.startswith("model.")]
    ref = world4.run(_initial, CONFIGS[kind], model, nranks=1)[0]
    got = world4.run(_initial, CONFIGS[kind], overrides)[0]
    assert ref.keys() <= got.keys()
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name
    if "model.tie_embeddings=true" in overrides:  # the last stage's head starts as the embedding
        assert torch.equal(got["lm_head.weight"], ref["embed.weight"])
