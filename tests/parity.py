"""Shared parity machinery: train a config under some layout and compare it with world size 1."""
from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
GRAD_ATOL = 1e-5


def train_layout(config: str, overrides: list[str], steps: int = 5) -> dict | None:
    """Run on every rank of the current world; rank 0 returns losses, step-1 grads and final params."""
    import torch.distributed as dist

    from engine.config import load_config
    from engine.parallel.parallelize import full_grads, full_state_dict
    from engine.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, config), [f"train.steps={steps}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    captured = {}
    forward_backward = trainer.forward_backward

    def capture_first(step):
        out = forward_backward(step)
        if step == 0:
            captured.update(full_grads(trainer.model, groups))
        return out

    trainer.forward_backward = capture_first
    records = [trainer.train_step() for _ in range(steps)]
    params = full_state_dict(trainer.model, groups)
    groups.destroy()
    if dist.get_rank() != 0:
        return None
    return {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
            "records": records, "grads": {k: v.numpy() for k, v in captured.items()},
            "params": {k: v.numpy() for k, v in params.items()}}


def params(names, slow=()) -> list:
    """Test ids for ``parametrize``; those in ``slow`` (combined layouts whose parts the fast tier
    already covers one by one) run in the full suite only."""
    unknown = set(slow) - set(names)
    if unknown:
        raise ValueError(f"slow ids {sorted(unknown)} are not among {list(names)}")
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


def world1_references(world, config: str, base: list[str], model_keys: tuple[str, ...] = ("model.",)):
    """``get(overrides)``: the world-size-1 run of ``config`` under the overrides that shape the model
    and the batch (those starting with ``model_keys``), trained once per distinct set and cached."""
    cache: dict[tuple, dict] = {}

    def get(overrides: list[str]) -> dict:
        key = tuple(o for o in overrides if o.startswith(model_keys))
        if key not in cache:
            cache[key] = world.run(train_layout, config, base + list(key), nranks=1)[0]
        return cache[key]

    return get


def assert_parity(ref: dict, out: dict, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL, grad_atol=GRAD_ATOL) -> None:
    ref_l, out_l = np.array(ref["losses"]), np.array(out["losses"])
    rel = np.abs(out_l - ref_l) / np.abs(ref_l)
    assert rel.max() <= loss_rtol, f"losses differ: ref {ref_l.tolist()} vs {out_l.tolist()} (max rel {rel.max():.2e})"
    ref_n, out_n = np.array(ref["grad_norms"]), np.array(out["grad_norms"])
    rel_n = np.abs(out_n - ref_n) / np.abs(ref_n)
    assert rel_n.max() <= loss_rtol, f"grad norms differ: ref {ref_n.tolist()} vs {out_n.tolist()}"
    assert_moe_parity(ref["records"], out["records"], loss_rtol)
    for kind, atol in (("grads", grad_atol), ("params", param_atol)):
        assert ref[kind].keys() == out[kind].keys(), f"{kind}: names differ"
        for name, expected in ref[kind].items():
            got = out[kind][name]
            assert got.shape == expected.shape, f"{kind} {name}: shape {got.shape} != {expected.shape}"
            err = float(np.abs(got - expected).max())
            assert err <= atol, f"{kind} {name}: max abs diff {err:.2e} > {atol}"


def assert_moe_parity(ref_records: list[dict], out_records: list[dict], rtol: float = LOSS_RTOL) -> None:
    """MoE runs: every step's aux and z-loss agree, and the expert load and drops are identical."""
    for step, (ref, out) in enumerate(zip(ref_records, out_records), start=1):
        assert ("expert_load" in ref) == ("expert_load" in out), f"step {step}: MoE metrics in one run only"
        if "expert_load" not in ref:
            continue
        for key in ("aux_loss", "z_loss"):
            err = abs(out[key] - ref[key])
            assert err <= rtol * abs(ref[key]) + 1e-12, f"step {step}: {key} {out[key]} != {ref[key]}"
        assert out["expert_load"] == ref["expert_load"], f"step {step}: expert load differs"
        assert out["dropped_tokens"] == ref["dropped_tokens"], f"step {step}: dropped tokens differ"
