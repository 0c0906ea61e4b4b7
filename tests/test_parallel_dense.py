"""Parity of the dense model: every layout against world size 1, 5 fp32 steps on identical data."""
import os

import pytest
import torch

from tests.parity import assert_parity, train_layout, world1_references

CONFIG = "launch/configs/tiny_dense.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_parity", "model.attn_backend=torch"]

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "dp2": (2, []),
    "tp2_dp2": (4, ["parallel.tp=2"]),
    "dp2_2microbatches": (2, ["train.micro_batch_size=1", "train.global_batch_size=4"]),
    # Many tiny buckets: reductions launch during backward, in order, overlapped with compute.
    "dp2_small_buckets": (2, ["parallel.bucket_size_mb=0.01"]),
    "tp2_sp_qknorm_tied_bias": (2, ["parallel.tp=2", "parallel.sp=true", "model.qk_norm=true",
                                    "model.tie_embeddings=true", "model.attention_bias=true"]),
}
# The reference for each layout uses the same model/data overrides at world size 1.
MODEL_KEYS = ("model.", "train.global_batch_size", "train.micro_batch_size")


@pytest.fixture(scope="module")
def references(world4):
    return world1_references(world4, CONFIG, BASE, MODEL_KEYS)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dense_parity(world4, references, layout):
    nranks, overrides = LAYOUTS[layout]
    ref = references(overrides)
    out = world4.run(train_layout, CONFIG, BASE + overrides, nranks=nranks)[0]
    assert_parity(ref, out)


def test_dp2_microbatches_is_two_per_rank():
    """The microbatch layout is what the name says: 4 sequences, dp=2, micro batch 1 -> 2 per rank."""
    from engine.config import load_config

    cfg = load_config(CONFIG, LAYOUTS["dp2_2microbatches"][1])
    per_rank = cfg.train.global_batch_size // cfg.dp_size(2)
    assert per_rank // cfg.train.micro_batch_size == 2


def _bf16_run():
    from tests.parity import train_layout

    return train_layout(CONFIG, ["train.dtype=bf16", "train.run_dir=runs/test_bf16", "model.attn_backend=torch",
                                 "parallel.tp=2", "parallel.sp=true"], steps=3)


def _bf16_dtypes():
    """bf16 compute keeps fp32 master weights and fp32 gradients."""
    from engine.config import load_config
    from engine.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, CONFIG), ["train.dtype=bf16", "train.run_dir=runs/test_bf16"])
    trainer = Trainer(cfg, build_groups(cfg))
    loss, _ = trainer.forward_backward(0)
    dtypes = {p.dtype for p in trainer.params} | {p.grad.dtype for p in trainer.params}
    return loss.dtype, dtypes


def test_bf16_tracks_fp32(world4, references):
    """bf16 is not exact, but at TP2+SP it stays close to the fp32 world-size-1 run."""
    ref = references([])
    out = world4.run(_bf16_run, nranks=2)[0]
    for a, b in zip(ref["losses"][:3], out["losses"]):
        assert abs(a - b) / a < 2e-2, (ref["losses"], out["losses"])
    loss_dtype, dtypes = world4.run(_bf16_dtypes, nranks=1)[0]
    assert loss_dtype == torch.float32 and dtypes == {torch.float32}
