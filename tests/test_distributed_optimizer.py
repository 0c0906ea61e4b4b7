"""The distributed optimizer against the plain one, and the sharded state it keeps.

Sharding the fp32 master weights and Adam states over data parallel changes where the arithmetic
happens, not what it computes: the reduce-scatter sums the same gradients as the all-reduce. Every
step's loss and gradient norm, and every parameter, agree within a relative 1e-6.
"""
import numpy as np
import pytest

from tests.parity import assert_close_tensors, params, train_layout

DENSE, MOE = "launch/configs/tiny_dense.yaml", "launch/configs/tiny_moe.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_distopt", "model.attn_backend=torch"]
RTOL = 1e-6

LAYOUTS = {
    "dp2": (DENSE, 2, []),
    "dp4": (DENSE, 4, []),
    "tp2_dp2": (DENSE, 4, ["parallel.tp=2", "parallel.sp=true"]),
    "ep2_dp2": (MOE, 4, ["parallel.ep=2"]),
    "pp2_dp2": (DENSE, 4, ["parallel.pp=2", "model.tie_embeddings=true"]),
}


def _relative(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _state_bytes(config, overrides):
    """This rank's optimizer state bytes and the model's trainable parameter count."""
    import os

    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, config), [*BASE, *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    out = (trainer.optimizer.state_bytes(), sum(p.numel() for p in trainer.params), groups.dims.pp)
    groups.destroy()
    return out


@pytest.mark.parametrize("layout", params(sorted(LAYOUTS), slow=["dp4", "pp2_dp2", "ep2_dp2"]))
def test_distributed_optimizer_matches_plain(world4, layout):
    config, nranks, overrides = LAYOUTS[layout]
    plain = world4.run(train_layout, config, BASE + overrides + ["optim.distributed=false"], steps=3, nranks=nranks)[0]
    sharded = world4.run(train_layout, config, BASE + overrides + ["optim.distributed=true"], steps=3, nranks=nranks)[0]
    assert not sharded["out_of_sync"], f"replicas differ after the all-gather: {sharded['out_of_sync']}"
    for key in ("losses", "grad_norms"):
        err = _relative(sharded[key], plain[key])
        assert err <= RTOL, f"{key} differ per step: {plain[key]} vs {sharded[key]} ({err:.1e})"
    for kind in ("first_grads", "last_grads", "params"):
        assert_close_tensors(kind, plain[kind], sharded[kind], RTOL)


@pytest.mark.slow
def test_optimizer_state_is_sharded_over_dp(world4):
    """DP4: each rank keeps a quarter of the Adam states (plus bucket padding) instead of all of them."""
    plain = world4.run(_state_bytes, DENSE, ["optim.distributed=false"], nranks=4)
    sharded = world4.run(_state_bytes, DENSE, ["optim.distributed=true"], nranks=4)
    params = plain[0][1]
    assert all(b == 8 * params for b, _, _ in plain), plain  # fp32: the parameters are the masters
    states = [b for b, _, _ in sharded]
    assert sum(states) == 8 * params, "the shards are disjoint and cover every parameter"
    assert max(states) <= 8 * params / 4 + 8 * 256, (states, 8 * params / 4)  # + one bucket's padding
