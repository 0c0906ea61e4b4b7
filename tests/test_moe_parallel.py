"""MoE parity: expert-parallel layouts against world size 1, 5 fp32 steps, for both router families.

Every step's LM loss, grad norm, aux and z-loss, expert load and drops, the first step's
gradients and the final parameters must agree (tests/parity.py). The balancing losses carry
large coefficients here so that a mis-scaled gradient of theirs would show in the router grads.
"""
import pytest

from tests.parity import (BF16_MOE, RTOL, assert_close_tensors, assert_moe_parity, assert_parity, params, train_layout,
                          world1_references)

CONFIG = "launch/configs/tiny_moe.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_moe_parity", "model.attn_backend=torch", "checkpoint.resume=none",
        "model.moe.aux_loss_coeff=0.05", "model.moe.z_loss_coeff=0.005"]
ROUTERS = {
    # Mixtral / Qwen-MoE: softmax top-2, renormalised; aux loss per microbatch.
    "softmax": [],
    # DeepSeek-V3: sigmoid, 4 groups of 2 experts, 2 groups per token, scaled weights, per-sequence
    # aux loss, and the aux-loss-free bias (which must stay identical on every replica).
    "sigmoid_grouped": ["model.moe.router=sigmoid", "model.moe.n_group=4", "model.moe.topk_group=2",
                        "model.moe.routed_scaling_factor=2.5", "model.moe.aux_loss_type=seq",
                        "model.moe.bias_update_rate=0.01"],
}
LAYOUTS = {
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep2_tp2_sp": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]),  # experts split over etp = tp
    "ep2_tp2_sp_etp1": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true", "parallel.etp=1"]),
    "ep2_dp2": (4, ["parallel.ep=2"]),  # dp = 4: two expert-data-parallel replicas of each expert
    "ep2_pp2": (4, ["parallel.ep=2", "parallel.pp=2", "parallel.pp_layout=[2,1]"]),  # MoE layers on both stages
    "ep2_pp2_zb1": (4, ["parallel.ep=2", "parallel.pp=2", "parallel.pp_layout=[2,1]", "parallel.pp_schedule=zb1"]),
    "ep2_cp2": (2, ["parallel.ep=2", "parallel.cp=2"]),  # EP folded over the CP ranks
    # zb1 with middle stages: a layer per stage, MoE on stages 1-3 (their routers' W passes deferred).
    "pp4_zb1": (4, ["parallel.pp=4", "parallel.pp_schedule=zb1", "model.num_layers=4"]),
}


@pytest.fixture(scope="module")
def references(world4):
    return world1_references(world4, CONFIG, BASE)  # keeps the overrides that shape the model (model.*)


# Every layout with both routers; the etp=1 folding variant with one, PP4 with the one whose bias and
# per-sequence aux loss a misplaced W pass would disturb most.
ONE_ROUTER = {"ep2_tp2_sp_etp1": "softmax", "pp4_zb1": "sigmoid_grouped"}
CASES = [(layout, router) for layout in LAYOUTS for router in sorted(ROUTERS)
         if ONE_ROUTER.get(layout, router) == router]


SLOW = ("ep2_cp2-sigmoid_grouped", "ep2_tp2_sp-sigmoid_grouped", "ep2-sigmoid_grouped", "ep2_pp2_zb1-softmax",
        "ep2_pp2_zb1-sigmoid_grouped", "pp4_zb1-sigmoid_grouped")


@pytest.mark.parametrize("case", params([f"{a}-{b}" for a, b in CASES], slow=SLOW))
def test_moe_parity(world4, references, case):
    layout, router = case.split("-")
    nranks, overrides = LAYOUTS[layout]
    ref = references(ROUTERS[router] + overrides)
    out = world4.run(train_layout, CONFIG, BASE + ROUTERS[router] + overrides, nranks=nranks)[0]
    assert_parity(ref, out)
    assert any(r["aux_loss"] > 0 and r["z_loss"] > 0 for r in out["records"])


def test_capacity_dropping_parity_under_ep(world4, references):
    """With a capacity factor the dropped assignments are the same at EP2 as at world size 1."""
    model = ["model.moe.capacity_factor=1.0"]
    ref = references(model)
    out = world4.run(train_layout, CONFIG, BASE + model + ["parallel.ep=2"], nranks=2)[0]
    assert_parity(ref, out)
    assert all(r["dropped_tokens"] > 0 for r in out["records"])


AUX_LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "cp2": (2, ["parallel.cp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_layout=[2,1]"]),
}


@pytest.mark.parametrize("router", sorted(ROUTERS))  # softmax: aux per microbatch; sigmoid_grouped: per sequence
@pytest.mark.parametrize("layout", list(AUX_LAYOUTS))
def test_aux_loss_is_layout_invariant(world4, references, layout, router):
    """The balancing losses (value and what they add to the gradient) equal world size 1's at TP2, CP2, EP2, PP2."""
    nranks, overrides = AUX_LAYOUTS[layout]
    ref = references(ROUTERS[router])
    out = world4.run(train_layout, CONFIG, BASE + ROUTERS[router] + overrides, nranks=nranks, steps=1)[0]
    assert_moe_parity(ref["records"][:1], out["records"])
    routers = {k: v for k, v in ref["first_grads"].items() if k.endswith("mlp.gate.weight")}
    assert routers  # the router gradient is mostly the balancing losses' here
    assert_close_tensors("router grads", routers, {k: out["first_grads"][k] for k in routers}, RTOL)


@pytest.mark.slow
def test_bf16_ep2_tp2_sp_matches_bf16_world1(world4):
    """bf16 (experts and the all-to-all in bf16, fp32 master weights) against world size 1 in bf16, within
    the bf16 tolerances; expert load and drops are still identical."""
    bf16 = BASE + ["train.dtype=bf16"]
    ref = world4.run(train_layout, CONFIG, bf16, nranks=1)[0]
    out = world4.run(train_layout, CONFIG, bf16 + ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"], nranks=4)[0]
    assert_parity(ref, out, **BF16_MOE)

def _parallelize_unwired(overrides: list[str]) -> str:
    """The message parallelize gives for a model built without its layout's MoE wiring."""
    import os

    from loom.config import load_config
    from loom.model.decoder import build_model
    from loom.parallel.parallelize import parallelize
    from loom.train.trainer import build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, CONFIG), overrides)
    groups = build_groups(cfg)
    try:
        parallelize(build_model(cfg.model), groups, cfg)
    except ValueError as e:
        return str(e)
    finally:
        groups.destroy()
    return "no error"


def test_a_model_built_without_its_layouts_wiring_is_refused(world4):
    """Under EP the layers must have been built with the all-to-all dispatcher: parallelize says so."""
    message = world4.run(_parallelize_unwired, ["parallel.ep=2"], nranks=2)[0]
    assert "was built for another layout" in message and "moe_wiring(groups, cfg)" in message, message
