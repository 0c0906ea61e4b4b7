"""A NaN in one rank's gradients: under ``skip`` no rank applies that step and the run goes on, counted;
under ``error`` (or after runtime.max_skipped_steps in a row) the run stops with a message naming the step."""
import os

import numpy as np
import pytest

from loom.config import ConfigError, load_config
from loom.train.guard import NonFiniteGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "launch/configs/tiny_dense.yaml"
BASE = ["train.dtype=fp32", "model.attn_backend=torch", "checkpoint.resume=none", "train.steps=5",
        "train.log_interval=100"]


def poisoned_run(overrides: list[str], bad_steps: list[int]):
    """Train DP2 (with the distributed optimizer) where rank 1's backward turns one weight's gradient
    into NaN at ``bad_steps`` (0-based). Every rank returns its records and its parameters after each step."""
    import torch
    import torch.distributed as dist

    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, CONFIG), BASE + overrides)
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    weight = trainer.model.layers["1"].mlp.down_proj.weight
    hook = weight.register_hook(lambda g: g * float("nan") if dist.get_rank() == 1 and
                                trainer.step in bad_steps else g)
    records, params, error = [], [], None
    snapshot = lambda: {n: p.detach().clone().numpy() for n, p in trainer.model.named_parameters()}  # noqa: E731
    params.append(snapshot())
    try:
        for _ in range(cfg.train.steps):
            records.append(trainer.train_step())
            params.append(snapshot())
    except FloatingPointError as e:
        error = str(e)
        params.append(snapshot())  # after the refused step
    hook.remove()
    state = trainer.optimizer.step_count
    groups.destroy()
    return {"records": records, "params": params, "error": error,
            "adam_steps": int(state) if torch.is_tensor(state) else state}


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_skip_drops_the_step_on_every_rank(world2):
    outs = world2.run(poisoned_run, ["runtime.on_nonfinite=skip"], [2])
    for rank, out in enumerate(outs):
        assert out["error"] is None, out["error"]
        records = out["records"]
        assert [r["skipped"] for r in records] == [False, False, True, False, False], rank
        assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
        assert not np.isfinite(records[2]["grad_norm"])
        assert _same(out["params"][2], out["params"][3]), f"rank {rank} applied the NaN step"
        assert not _same(out["params"][3], out["params"][4]), "the run did not go on after the skip"
        assert all(np.isfinite(v).all() for v in out["params"][-1].values())
        assert out["adam_steps"] == 4
    assert _same(outs[0]["params"][-1], outs[1]["params"][-1])


def test_error_names_the_step(world2):
    outs = world2.run(poisoned_run, ["runtime.on_nonfinite=error"], [1])
    for out in outs:
        assert out["error"] is not None and "step 2:" in out["error"] and "on_nonfinite=error" in out["error"]
        assert len(out["records"]) == 1 and _same(out["params"][1], out["params"][2]), "the bad step was applied"


def test_too_many_skips_in_a_row_stop_the_run(world2):
    outs = world2.run(poisoned_run, ["runtime.on_nonfinite=skip", "runtime.max_skipped_steps=2"], [1, 2, 3])
    for out in outs:
        assert "step 3:" in out["error"] and "max_skipped_steps=2" in out["error"]
        assert [r["skipped"] for r in out["records"]] == [False, True]


def test_guard_counts_streaks_and_checks_its_config():
    guard = NonFiniteGuard("skip", 3, announce=False)
    assert not guard.skips(1, 1.0, 2.0)
    assert guard.skips(2, float("nan"), 2.0) and guard.skips(3, 1.0, float("inf"))
    assert not guard.skips(4, 1.0, 2.0)  # a finite step ends the streak
    assert guard.skips(5, float("nan"), 1.0) and guard.skips(6, float("nan"), 1.0) and guard.skipped == 4
    with pytest.raises(FloatingPointError, match="step 7:"):
        guard.skips(7, float("nan"), 1.0)
    with pytest.raises(ConfigError, match="runtime.on_nonfinite"):
        load_config(os.path.join(ROOT, CONFIG), ["runtime.on_nonfinite=ignore"]).validate(1)
