"""Activation recompute: bitwise the same training, fewer activations kept, MoE statistics counted once."""
import os

import numpy as np
import pytest

from tests.parity import ROOT, params, train_layout

DENSE, MOE = "launch/configs/tiny_dense.yaml", "launch/configs/tiny_moe.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_recompute", "model.attn_backend=torch"]
# MoE with every balancing loss on: a recomputed router must neither add its loss twice nor count its load twice.
MOE_LOSSES = ["model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001", "model.moe.aux_loss_type=seq"]
MODES = {"selective": ["train.recompute=selective"], "full": ["train.recompute=full"],
         "full_1_layer": ["train.recompute=full", "train.recompute_layers=1"]}


def _assert_identical(ref: dict, out: dict) -> None:
    assert out["losses"] == ref["losses"] and out["grad_norms"] == ref["grad_norms"]
    for kind in ("first_grads", "last_grads", "params"):
        for name, tensor in ref[kind].items():
            assert np.array_equal(out[kind][name], tensor), f"{kind} {name}"
    for a, b in zip(ref["records"], out["records"]):
        for key in ("expert_load", "aux_loss", "z_loss", "dropped_tokens"):
            assert a.get(key) == b.get(key), f"{key}: {a.get(key)} != {b.get(key)}"


@pytest.fixture(scope="module")
def references(world2):
    return {name: world2.run(train_layout, config, BASE + extra, steps=2, nranks=1)[0]
            for name, config, extra in (("dense", DENSE, []), ("moe", MOE, MOE_LOSSES))}


@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("mode", params(sorted(MODES), slow=["full_1_layer"]))
def test_recompute_is_bitwise_the_same(world2, references, model, mode):
    config, extra = (DENSE, []) if model == "dense" else (MOE, MOE_LOSSES)
    out = world2.run(train_layout, config, BASE + extra + MODES[mode], steps=2, nranks=1)[0]
    _assert_identical(references[model], out)


@pytest.mark.slow
def test_full_recompute_under_ep2_tp2(world4):
    """Recomputed blocks replay the EP all-to-alls and SP gathers in backward, in the same order on every rank."""
    layout = ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]
    ref = world4.run(train_layout, MOE, BASE + MOE_LOSSES + layout, steps=2)[0]
    out = world4.run(train_layout, MOE, BASE + MOE_LOSSES + layout + ["train.recompute=full"], steps=2)[0]
    _assert_identical(ref, out)


def _activation_bytes(overrides):
    """Bytes one microbatch keeps for backward, over two steps of one microbatch each."""
    from loom.config import load_config
    from loom.train.activations import ActivationTracker
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, DENSE), [*BASE, "train.global_batch_size=1", "data.seq_len=256",
                                                  "model.hidden_size=128", "model.intermediate_size=512",
                                                  "model.num_layers=4", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    with ActivationTracker(exclude=[b.param_data for b in trainer.grads.buckets]) as tracker:
        for _ in range(2):
            trainer.train_step()
    assert tracker.bytes == 0, "every saved tensor is released by backward"
    groups.destroy()
    return tracker.peak


def test_recompute_keeps_fewer_activations(world2):
    measured = {mode: world2.run(_activation_bytes, [f"train.recompute={mode}"], nranks=1)[0]
                for mode in ("none", "selective", "full")}
    print("activation bytes per microbatch (4 layers, 256 tokens, hidden 128):", measured)
    assert measured["none"] > measured["selective"] > measured["full"] > 0, measured
