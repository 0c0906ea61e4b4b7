"""The hot paths' budget of host syncs, counted on CPU (tests/host_syncs.py says what is counted).

Per layer and microbatch: attention on the Triton kernels makes none (its block tables are built
on the device, once per microbatch, and reused by every layer: counted too); a MoE layer makes at
most one (the exchanged row counts, under EP). Counting a model of one layer and one of two, over
the same microbatches, cancels what every microbatch or step pays once (loss, gradient reduction,
the first layer's table builds).
"""
import os
from unittest import mock

import pytest
import torch

from loom.config import load_config
from loom.data import PackedDataset, collate, synthetic_corpus
from loom.model.batch import PackedBatch
from loom.model.decoder import build_model
from loom.kernels import block_table
from tests.host_syncs import count_host_syncs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


MICROBATCHES = 2


def _model_syncs(config: str, overrides: list[str]):
    """Host syncs of forward + backward of MICROBATCHES packed microbatches (the Triton kernels, interpreted)."""
    cfg = load_config(os.path.join(ROOT, config), ["model.attn_backend=triton", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    data = PackedDataset(synthetic_corpus(cfg.model.vocab_size, 4096, seed=0), cfg.data.seq_len)
    batches = [collate([data[2 * i], data[2 * i + 1]]) for i in range(MICROBATCHES)]

    def run():
        for b in batches:
            logits = model(PackedBatch(input_ids=b.input_ids, positions=b.positions, cu_seqlens=b.cu_seqlens,
                                       max_seqlen=b.max_seqlen))
            torch.nn.functional.cross_entropy(logits, b.labels, ignore_index=-100).backward()

    run()  # first calls probe and cache (kernel specialisations, capability checks)
    builds = []
    build = block_table.block_table
    with mock.patch.object(block_table, "block_table", lambda *a: builds.append(a[1:]) or build(*a)):
        with count_host_syncs() as syncs:
            run()
    syncs.table_builds = builds
    return syncs


def test_triton_attention_layer_makes_no_host_sync():
    import loom.kernels.flash_attn as fa

    assert fa.INTERPRETED and fa.STDLIB_INTERPRETED  # tests/conftest.py sets TRITON_INTERPRET on CPU
    one, two = (_model_syncs("launch/configs/tiny_dense.yaml", [f"model.num_layers={n}"]) for n in (1, 2))
    assert len(two) - len(one) == 0, f"one layer: {one}\ntwo layers: {two}"
    # The tables are built once per microbatch, by the first layer's forward, and every other launch
    # (later layers, the backward) reuses them: on CPU all three kernels share one block size.
    for syncs in (one, two):
        assert len(syncs.table_builds) == MICROBATCHES, syncs.table_builds


@pytest.mark.slow
@pytest.mark.parametrize("capacity,budget", [("null", 0), ("1.0", 1)], ids=["no_capacity", "capacity"])
def test_moe_layer_on_one_device(capacity, budget):
    """Grouped GEMM needs no host counts; a capacity factor needs the kept rows, read once."""
    one, two = (_model_syncs("launch/configs/tiny_moe.yaml", [f"model.num_layers={n}", "model.moe.first_k_dense=0",
                                                              f"model.moe.capacity_factor={capacity}"])
                for n in (1, 2))
    assert (len(two) - len(one)) / MICROBATCHES <= budget, f"one layer: {one}\ntwo layers: {two}"


def _moe_ep_syncs(num_layers: int, run_dir: str):
    """Rank-side: host syncs of one step's forward + backward of a MoE model (every layer MoE) under EP2."""
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, "launch/configs/tiny_moe.yaml"),
                      [f"model.num_layers={num_layers}", "model.moe.first_k_dense=0", "model.attn_backend=triton",
                       "parallel.ep=2", "train.global_batch_size=4", "checkpoint.resume=none",
                       f"train.run_dir={run_dir}"])
    groups = build_groups(cfg)
    try:
        trainer = Trainer(cfg, groups)
        microbatches = trainer.microbatches(0)
        trainer.forward_backward(0, microbatches)
        with count_host_syncs() as syncs:
            trainer.forward_backward(0, microbatches)
    finally:
        groups.destroy()
    return len(syncs), repr(syncs), len(microbatches)


@pytest.mark.slow
def test_moe_layer_makes_one_host_sync_under_ep2(world2, tmp_path):
    one = world2.run(_moe_ep_syncs, 1, str(tmp_path / "one"))
    two = world2.run(_moe_ep_syncs, 2, str(tmp_path / "two"))
    for (n1, calls1, mbs), (n2, calls2, _) in zip(one, two):
        assert mbs == MICROBATCHES
        per_layer_and_microbatch = (n2 - n1) / mbs
        assert per_layer_and_microbatch <= 1, f"one layer: {calls1}\ntwo layers: {calls2}"
