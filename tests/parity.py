"""Shared parity machinery: train a config under some layout and compare it with world size 1."""
from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fp32: every tensor within a relative 1e-5 of world size 1, ||got - ref|| <= RTOL * ||ref||. Per tensor,
# not per element: the median attention gradient is ~5e-5, so an absolute 1e-5 would pass a 20% error.
LOSS_RTOL = 1e-5
RTOL = 1e-5
# A tensor whose reference norm is below FLOOR x the norm of its whole set is measured against that
# floor: the gradient of an attention k bias is zero up to rounding (softmax ignores a shift of a
# whole row of scores), so its own norm is noise.
FLOOR = 1e-4
# Adam divides by sqrt(v), which amplifies rounding where gradients are small: updates are held to
# 1e-4 (a skipped or wrong update is off by ~1), the parameters themselves to RTOL.
UPDATE_RTOL = 1e-4


def train_layout(config: str, overrides: list[str], steps: int = 5) -> dict | None:
    """Run on every rank of the current world; rank 0 returns what ``assert_parity`` compares.

    That is the losses, the gradients of the first and the last step, the parameters before and
    after training (all at full shape), and the parameters whose replicas ended up differing
    across ranks (every rank takes part in that check).
    """
    import torch.distributed as dist

    from loom.config import load_config
    from loom.parallel.inspect import full_grads, full_state_dict, replicas_out_of_sync
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, config), [f"train.steps={steps}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    initial = full_state_dict(trainer.model, groups)
    grads = {}
    forward_backward = trainer.forward_backward

    def capture(step, microbatches=None):
        out = forward_backward(step, microbatches)
        if step in (0, steps - 1):  # before clipping: the reduced gradients themselves
            reduced = full_grads(trainer.model, groups, trainer.grads.local_grad)
            if step == 0:
                grads["first"] = reduced
            if step == steps - 1:
                grads["last"] = reduced
        return out

    trainer.forward_backward = capture
    records = [trainer.train_step() for _ in range(steps)]
    final = _with_masters(full_state_dict(trainer.model, groups), trainer, cfg.model.tie_embeddings)
    out_of_sync = replicas_out_of_sync(trainer.model, groups)
    groups.destroy()
    if dist.get_rank() != 0:
        return None
    as_numpy = lambda tensors: {k: v.float().numpy() for k, v in tensors.items()}  # noqa: E731
    return {"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
            "records": records, "first_grads": as_numpy(grads["first"]), "last_grads": as_numpy(grads["last"]),
            "initial": as_numpy(initial), "params": as_numpy(final), "out_of_sync": out_of_sync}


def _with_masters(params: dict, trainer, tied: bool) -> dict:
    """bf16 parameters are their fp32 masters rounded: compare the masters, which hold every update
    (a few Adam steps move a norm weight of 1.0 by one or two bf16 ulps)."""
    from loom.train.checkpoint import global_state

    if not trainer.optimizer.keeps_masters:
        return params
    state = global_state(trainer.model, trainer.optimizer, tied)
    masters = {k[len("optim/"):-len("/master")]: v for k, v in state.items() if k.endswith("/master")}
    def canonical(name: str) -> str:  # a tied head's master is the embedding's
        return name[: -len("lm_head.weight")] + "embed.weight" if tied and name.endswith("lm_head.weight") else name

    return {k: masters.get(canonical(k), v) for k, v in params.items()}


def _norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64).ravel()))


def _floor(tensors: dict) -> float:
    """FLOOR x the norm of the whole set: below it, a tensor's own norm is rounding noise."""
    return FLOOR * float(np.sqrt(sum(_norm(t) ** 2 for t in tensors.values())))


def relative_error(got: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> float:
    """``||got - ref|| / max(||ref||, floor)`` in float64; 0 when both are zero, inf when only ``ref`` is."""
    diff = _norm(got.astype(np.float64) - ref.astype(np.float64))
    norm = max(_norm(ref), floor)
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def assert_close_tensors(kind: str, ref: dict, out: dict, rtol: float, floor: float | None = None) -> float:
    """Every tensor of ``out`` within ``rtol`` of ``ref`` (relative, per tensor, above ``floor``: by default
    FLOOR of the set). Returns the worst error."""
    assert ref.keys() == out.keys(), f"{kind}: names differ: {sorted(ref.keys() ^ out.keys())[:8]}"
    floor = _floor(ref) if floor is None else floor
    worst = 0.0
    for name, expected in ref.items():
        got = out[name]
        assert got.shape == expected.shape, f"{kind} {name}: shape {got.shape} != {expected.shape}"
        err = relative_error(got, expected, floor)
        assert err <= rtol, f"{kind} {name}: relative error {err:.2e} > {rtol:.0e}"
        worst = max(worst, err)
    return worst


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


# bf16 against bf16 at world size 1. What bf16 rounding allows, measured at TP2+SP, DP2 and DP2 with bf16
# reductions: the first step's gradients 0.7% for the worst tensor (a norm weight), so they are held
# to 1%, where a 2% error in any one tensor's gradient fails (test_parallel_dense.py shows it for
# every tensor). Adam's first step is about lr * sign(g), so a gradient element that rounding tips
# across zero flips its update: a norm weight's first update differs by 25%, its 5-step update by
# 3.5%, and the last step's gradients, after the runs' rounding has compounded, by 3%. Those are
# held to 5%; a tensor whose update is missing or wrong is off by ~100%.
BF16 = dict(loss_rtol=1e-3, rtol=1e-2, drift_rtol=5e-2, update_rtol=5e-2, moved=0.02)
# MoE with expert tensor parallelism: the experts' partial sums are reduced in bf16 and a token near a
# routing tie may pick another expert (measured at EP2 x TP2+SP: first gradients 2.8%, last 4.8%,
# updates 6.1%).
BF16_MOE = {**BF16, "rtol": 4e-2, "drift_rtol": 8e-2, "update_rtol": 0.1}


def assert_parity(ref: dict, out: dict, loss_rtol=LOSS_RTOL, rtol=RTOL, update_rtol=UPDATE_RTOL,
                  moved: float = 0.0, drift_rtol: float | None = None) -> dict[str, float]:
    """``out`` (some layout) matches ``ref`` (world size 1): losses, gradient norms and MoE metrics every
    step; every gradient at the first and the last step; every parameter's total update; and every
    replicated parameter is bit-identical on all its ranks. Returns the worst relative error per kind.

    ``rtol`` holds the first step's gradients; ``drift_rtol`` (default ``rtol``) the last step's, where
    the two runs' rounding has compounded over the steps between."""
    assert not out["out_of_sync"], f"replicas differ across ranks (name: ranks unlike rank 0): {out['out_of_sync']}"
    ref_l, out_l = np.array(ref["losses"]), np.array(out["losses"])
    rel = np.abs(out_l - ref_l) / np.abs(ref_l)
    assert rel.max() <= loss_rtol, f"losses differ: ref {ref_l.tolist()} vs {out_l.tolist()} (max rel {rel.max():.2e})"
    ref_n, out_n = np.array(ref["grad_norms"]), np.array(out["grad_norms"])
    rel_n = np.abs(out_n - ref_n) / np.abs(ref_n)
    assert rel_n.max() <= loss_rtol, f"grad norms differ: ref {ref_n.tolist()} vs {out_n.tolist()}"
    assert_moe_parity(ref["records"], out["records"], loss_rtol, moved)
    worst = {"loss": float(rel.max())}
    assert_close_tensors("initial params", ref["initial"], out["initial"], 0.0)  # same init under any layout
    for kind, tol in (("first_grads", rtol), ("last_grads", rtol if drift_rtol is None else drift_rtol)):
        worst[kind] = assert_close_tensors(kind, ref[kind], out[kind], tol)
    # The update, not the parameter: ||p|| dwarfs a few steps of Adam, so a parameter that missed
    # its update entirely would still be within 1e-5 of the reference.
    # A tensor whose gradient is rounding noise (below the floor) gets a noise update from Adam on
    # either side; its parameters are still compared below.
    grads = ref["first_grads"]
    floor = _floor(grads)
    learning = [k for k in ref["params"] if k not in grads or _norm(grads[k]) >= floor]
    updates = {which: {k: run["params"][k] - run["initial"][k] for k in learning} for which, run in
               (("ref", ref), ("out", out))}
    worst["updates"] = assert_close_tensors("updates", updates["ref"], updates["out"], update_rtol)
    # A tensor that starts at zero (a bias) is nothing but its updates, so it is held to update_rtol:
    # Adam amplifies the rounding of its small gradient like any other update.
    zero = {k for k in ref["params"] if not ref["initial"][k].any()}
    for which, keep, tol in (("params", False, min(rtol, update_rtol)), ("zero-initialised params", True,
                                                                        update_rtol)):
        part = {run: {k: v for k, v in src["params"].items() if (k in zero) == keep} for run, src in
                (("ref", ref), ("out", out))}
        worst[which] = assert_close_tensors(which, part["ref"], part["out"], tol, _floor(ref["params"]))
    return worst


def assert_moe_parity(ref_records: list[dict], out_records: list[dict], rtol: float = LOSS_RTOL,
                      moved: float = 0.0) -> None:
    """MoE runs: every step's aux and z-loss agree, and the expert load and drops are identical, or, with
    ``moved`` > 0 (bf16, where a token near a tie may pick another expert), at most that fraction of
    the assignments went to other experts."""
    for step, (ref, out) in enumerate(zip(ref_records, out_records), start=1):
        assert ("expert_load" in ref) == ("expert_load" in out), f"step {step}: MoE metrics in one run only"
        if "expert_load" not in ref:
            continue
        for key in ("aux_loss", "z_loss"):
            err = abs(out[key] - ref[key])
            assert err <= rtol * abs(ref[key]) + 1e-12, f"step {step}: {key} {out[key]} != {ref[key]}"
        assert ref["expert_load"].keys() == out["expert_load"].keys(), f"step {step}: MoE layers differ"
        for layer, load in ref["expert_load"].items():
            got, total = np.array(out["expert_load"][layer]), np.array(load)
            assert got.sum() == total.sum(), f"step {step}: layer {layer} assigned {got.sum()} != {total.sum()}"
            changed = np.abs(got - total).sum() / 2 / total.sum()
            assert changed <= moved, (f"step {step}: layer {layer} expert load {got.tolist()} != {total.tolist()} "
                                      f"({changed:.1%} of assignments moved)")
        assert out["dropped_tokens"] == ref["dropped_tokens"], f"step {step}: dropped tokens differ"
