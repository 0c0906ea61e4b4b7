"""MoE units: routers, capacity, balancing losses, grouped GEMM, the token dispatcher (local and
through the EP all-to-all), the expert group layout, config errors, and the metrics of a run."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from loom.config import ConfigError, MoEConfig, load_config
from loom.model.moe import (
    GroupedExperts,
    LocalDispatcher,
    MoE,
    Router,
    Routing,
    apply_capacity,
    route,
)
from loom.compat import grouped_mm_runs
from loom.parallel.mesh import ParallelDims, expert_group_layout

CONFIG = "launch/configs/tiny_moe.yaml"


def _routing(experts, weights):
    experts = torch.as_tensor(experts)
    weights = torch.as_tensor(weights, dtype=torch.float32)
    return Routing(experts, weights, weights.clone(), torch.zeros(experts.shape[0], 1))


class Identity(torch.nn.Module):
    """Experts that return their input times ``scale`` (and check the counts they are given)."""

    def __init__(self, num_experts, scale=1.0):
        super().__init__()
        self.num_experts, self.scale = num_experts, scale

    def forward(self, x, counts, host_counts=None):
        assert int(counts.sum()) == x.shape[0] and counts.numel() == self.num_experts
        assert host_counts is None or host_counts == counts.tolist()
        return x * self.scale

    def needs_host_counts(self, x):
        return False


# ----------------------------------------------------------------------------- routing


def test_softmax_topk_renormalised_matches_mixtral():
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    r = route(logits, MoEConfig(num_experts=8, top_k=2))
    top = logits.topk(2, dim=-1)
    assert torch.equal(r.experts, top.indices)
    torch.testing.assert_close(r.weights, torch.softmax(top.values, dim=-1))  # Mixtral: softmax over the top-k
    plain = route(logits, MoEConfig(num_experts=8, top_k=2, norm_topk_prob=False))  # Qwen2-MoE
    torch.testing.assert_close(plain.weights, torch.softmax(logits, -1).gather(-1, top.indices))


def _logit(p):
    p = torch.tensor(p)
    return torch.log(p / (1 - p))


def test_sigmoid_group_limited_routing_and_selection_bias():
    """DeepSeek-V3: groups ranked by their top-2 sum; the bias picks experts but never weighs them."""
    cfg = MoEConfig(num_experts=8, top_k=2, router="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    # groups {0,1} {2,3} {4,5} {6,7}: sums 1.0, 1.2, 1.3, 0.2; expert 0 alone scores best but its group loses.
    scores = [0.95, 0.05, 0.62, 0.58, 0.70, 0.60, 0.10, 0.10]
    logits = _logit(scores).unsqueeze(0)
    r = route(logits, cfg)
    assert r.experts.tolist() == [[4, 2]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.70, 0.62]]) / 1.32 * 2.5)
    bias = torch.zeros(8)
    bias[3] = 0.5  # lifts group {2,3} to the top and expert 3 within it
    r = route(logits, cfg, bias)
    assert r.experts.tolist() == [[3, 4]]
    torch.testing.assert_close(r.weights, torch.tensor([[0.58, 0.70]]) / 1.28 * 2.5)


def test_bias_update_moves_toward_balance():
    router = Router(4, 4, correction_bias=True)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.1)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


# ----------------------------------------------------------------------------- capacity


def test_capacity_drops_the_lowest_probabilities_deterministically():
    experts = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1]])
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.1], [0.7, 0.1], [0.5, 0.1], [0.6, 0.1], [0.5, 0.1]])
    for _ in range(2):  # same answer every time
        r = Routing(experts.clone(), scores.clone(), scores.clone(), torch.zeros(6, 2))
        dropped = apply_capacity(r, num_experts=2, capacity=3)
        # expert 0 keeps 0.9, 0.7, 0.6; expert 1's six equal scores keep the lowest token indices 0, 1, 2
        assert r.experts.tolist() == [[0, 1], [-1, 1], [0, 1], [-1, -1], [0, -1], [-1, -1]]
        assert dropped == 6 and float(r.weights[r.experts < 0].abs().sum()) == 0.0


def test_moe_layer_capacity_counts_drops():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.25)  # capacity ceil(0.25 * 16 * 2 / 4) = 2
    moe = MoE(16, cfg, intermediate=8)
    for m in (moe.gate, moe.experts):
        m.reset_parameters(0.5)
    moe(torch.randn(16, 16))
    kept = moe.stats.load
    assert kept.max() <= 2 and int(kept.sum()) + moe.stats.dropped == 16 * 2 and moe.stats.dropped > 0


# ----------------------------------------------------------------------------- balancing losses


def _moe(cfg, hidden=8, seed=0, scope=None):
    torch.manual_seed(seed)
    moe = MoE(hidden, cfg, intermediate=8, scope=scope)
    for m in (moe.gate, moe.experts):
        m.reset_parameters(0.5)
    return moe


def _switch(probs, experts, e, k):
    counts = torch.bincount(experts.reshape(-1), minlength=e).float()
    return e / (k * probs.shape[0] ** 2) * (counts * probs.sum(0)).sum()


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_switch_aux_and_z_loss_value_and_gradient(router):
    cfg = MoEConfig(num_experts=4, top_k=2, router=router, aux_loss_coeff=1.0, z_loss_coeff=0.1)
    moe = _moe(cfg)
    x = torch.randn(10, 8)
    (moe(x) * 0).sum().backward()  # only the attached balancing losses reach the router
    weight = moe.gate.weight.detach().clone().requires_grad_()
    logits = x @ weight.T
    probs = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    experts = probs.detach().topk(2, dim=-1).indices
    if router == "sigmoid":
        probs = probs / probs.sum(-1, keepdim=True)
    aux = _switch(probs, experts, 4, 2)
    z = 0.1 * torch.logsumexp(logits, -1).square().mean()
    (aux + z).backward()
    assert math.isclose(float(moe.stats.aux), float(aux.detach()), rel_tol=1e-6)
    assert math.isclose(float(moe.stats.z), float(z.detach()), rel_tol=1e-6)
    torch.testing.assert_close(moe.gate.weight.grad, weight.grad, rtol=1e-5, atol=1e-7)


def test_per_sequence_aux_loss_is_the_mean_over_sequences():
    from loom.parallel.expert_parallel import ShardedBalanceScope

    cfg = MoEConfig(num_experts=4, top_k=2, aux_loss_coeff=1.0, aux_loss_type="seq")
    moe = _moe(cfg, scope=ShardedBalanceScope(seq_len=5, sequences_per_step=2, micro_batch_size=2, sp_group=None,
                                              shard_group=None))
    x = torch.randn(10, 8)
    moe(x)
    probs = torch.softmax(x @ moe.gate.weight.detach().T, -1)
    experts = probs.topk(2, dim=-1).indices
    expected = (_switch(probs[:5], experts[:5], 4, 2) + _switch(probs[5:], experts[5:], 4, 2)) / 2
    assert math.isclose(float(moe.stats.aux), float(expected), rel_tol=1e-6)


# ----------------------------------------------------------------------------- experts and dispatch


def test_grouped_mm_exists_and_runs_on_cpu():
    """torch 2.13 has it on CPU for fp32 and bf16; if a future torch drops it, the loop takes over."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    assert grouped_mm_runs("cpu", torch.float32) and grouped_mm_runs("cpu", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_and_loop_agree(dtype):
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 16)
    experts.reset_parameters(0.2)
    x = torch.randn(20, 32)
    counts = torch.tensor([7, 0, 13, 0])  # uneven, with empty experts
    if not experts.use_grouped_mm(x.device, dtype):
        pytest.skip("torch._grouped_mm does not run here")
    outs, grads = [], []
    for grouped in (True, False):
        experts.grouped_gemm = grouped
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = experts(xi, counts)
        y.float().pow(2).sum().backward()
        outs.append(y.float())
        grads.append([xi.grad] + [p.grad.clone() for p in experts.parameters()])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert outs[0].dtype == outs[1].dtype
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)
    assert float(grads[0][1][1].abs().sum()) == 0.0  # expert 1 got no token, so no gradient


@pytest.mark.parametrize("top_k", [1, 2])
def test_local_dispatch_restores_input_and_gradient(top_k):
    x = torch.randn(9, 6, requires_grad=True)
    experts = torch.stack([torch.randperm(4)[:top_k] for _ in range(9)])
    routing = _routing(experts, torch.full((9, top_k), 1.0 / top_k))
    y = LocalDispatcher()(x, routing, Identity(4))
    assert torch.equal(y, x)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_local_dispatch_uneven_routing():
    """Every token on expert 2, none on the others: still the exact SwiGLU of expert 2."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 8, grouped_gemm=False)
    experts.reset_parameters(0.3)
    x = torch.randn(5, 8)
    y = LocalDispatcher()(x, _routing(torch.full((5, 1), 2), torch.ones(5, 1)), experts)
    w1, w3, w2 = experts.gate_proj[2], experts.up_proj[2], experts.down_proj[2]
    torch.testing.assert_close(y, F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2))


def _ep_dispatch(case: str):
    """Rank-side: the EP dispatcher over the world against the single-device reference."""
    import torch.distributed as dist

    from loom.parallel.expert_parallel import ExpertParallelDispatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    torch.manual_seed(10 + rank)  # each rank has its own tokens
    x = torch.randn(12, 8, requires_grad=True)
    if case == "uneven":  # every token of every rank to expert 0 (on rank 0); rank 1's experts get nothing
        routing = _routing(torch.zeros(12, 1, dtype=torch.long), torch.ones(12, 1))
    else:
        routing = _routing(torch.stack([torch.randperm(4)[:2] for _ in range(12)]), torch.full((12, 2), 0.5))
    if case in ("identity", "uneven"):
        y = ExpertParallelDispatcher(group, 4, ep=world, etp=1)(x, routing, Identity(4 // world, scale=1.0))
        g = torch.randn_like(y)
        y.backward(g)
        return bool(torch.equal(y, x)), bool(torch.equal(x.grad, g))
    ep, etp = (world, 1) if case == "experts_ep" else (1, world)
    torch.manual_seed(0)  # the same full experts everywhere
    full = GroupedExperts(4, 8, 16, grouped_gemm=False)
    full.reset_parameters(0.3)
    ref = LocalDispatcher()(x, routing, full)
    ref_x = torch.autograd.grad(ref.square().sum(), x)[0]
    local = GroupedExperts(4 // ep, 8, 16 // etp, grouped_gemm=False)
    e_slice = slice(rank * 4 // ep, (rank + 1) * 4 // ep) if ep > 1 else slice(None)
    f_slice = slice(rank * 16 // etp, (rank + 1) * 16 // etp) if etp > 1 else slice(None)
    with torch.no_grad():
        local.gate_proj.copy_(full.gate_proj[e_slice, f_slice])
        local.up_proj.copy_(full.up_proj[e_slice, f_slice])
        local.down_proj.copy_(full.down_proj[e_slice, :, f_slice])
    y = ExpertParallelDispatcher(group, 4, ep=ep, etp=etp)(x, routing, local)
    got_x = torch.autograd.grad(y.square().sum(), x)[0]
    # etp sums partial products in another order: compare relative to the magnitudes
    return float((y - ref).abs().max() / ref.abs().max()), float((got_x - ref_x).abs().max() / ref_x.abs().max())


def test_ep2_dispatch_restores_input_and_gradient(world2):
    for ok_y, ok_grad in world2.run(_ep_dispatch, "identity"):
        assert ok_y and ok_grad


def test_ep2_dispatch_uneven_routing(world2):
    """All tokens of both ranks go to one expert on rank 0; rank 1 receives none and still takes part."""
    for ok_y, ok_grad in world2.run(_ep_dispatch, "uneven"):
        assert ok_y and ok_grad


@pytest.mark.parametrize("case", ["experts_ep", "experts_etp"])
def test_ep2_and_etp2_dispatch_match_single_device(world2, case):
    for err_y, err_grad in world2.run(_ep_dispatch, case):
        assert err_y < 1e-5 and err_grad < 1e-5, (err_y, err_grad)


# ----------------------------------------------------------------------------- layout and config

# Pinned by hand: world 16, tp=2, cp=2, dp=2, pp=2, ep=2, etp=tp. Expert rank order within a stage
# is (edp, ep, etp), etp fastest; ep lands on the CP ranks, edp on the DP ranks.
EXPERT16 = {
    "ep": [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]],
    "etp": [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]],
    "edp": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
    "ep_etp": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
    "emp": [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]],
}
DIMS16 = ParallelDims(tp=2, cp=2, dp=2, pp=2, ep=2)


def test_expert_group_layout_is_pinned():
    assert expert_group_layout(DIMS16) == EXPERT16
    # etp=1 (Megatron folding): ep runs over the TP ranks, each with its own sequence-parallel tokens.
    assert expert_group_layout(ParallelDims(tp=2, dp=2, ep=2, etp=1)) == {
        "ep": [[0, 1], [2, 3]], "etp": [[0], [1], [2], [3]], "edp": [[0, 2], [1, 3]],
        "ep_etp": [[0, 1], [2, 3]], "emp": [[0, 1], [2, 3]]}


def test_device_mesh_builds_the_pinned_expert_groups():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from loom.parallel.mesh import ParallelGroups

    for rank in range(16):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=16)
        try:
            groups = ParallelGroups(DIMS16, device=torch.device("cpu"))
            for name, layout in EXPERT16.items():
                assert groups.ranks(name) == next(g for g in layout if rank in g), (rank, name)
            assert groups.ep_rank == groups.ranks("ep").index(rank)
            assert groups.etp_rank == groups.ranks("etp").index(rank)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.ep=3", "train.global_batch_size=6"], 3, "parallel.ep=3 does not divide model.moe.num_experts=8"),
    (["parallel.ep=4"], 2, r"parallel.ep=4 does not divide dp\*cp=2\*1=2"),
    (["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"], 2, r"parallel.ep=2 does not divide dp\*cp=1\*1=1"),
    (["parallel.tp=2"], 2, "needs parallel.sp=true"),
    (["parallel.tp=2", "parallel.sp=true", "parallel.etp=3"], 2, "parallel.etp=3 must be 1 or parallel.tp=2"),
    (["model.moe.n_group=3"], 1, "model.moe.n_group=3 does not divide model.moe.num_experts=8"),
    (["model.moe.router=relu"], 1, "model.moe.router='relu' must be softmax or sigmoid"),
    (["model.moe.num_experts=0", "parallel.ep=2"], 2, "need model.moe.num_experts > 0"),
])
def test_config_errors_name_the_key(overrides, world, message):
    cfg = load_config(CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world)


# ----------------------------------------------------------------------------- a run's metrics


def _train_metrics(overrides, run_dir):
    import torch.distributed as dist

    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, CONFIG), ["model.attn_backend=torch", "checkpoint.resume=none",
                                                   f"train.run_dir={run_dir}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    trainer.fit()
    biases = {name: b.clone() for name, b in trainer.model.named_buffers() if name.endswith("correction_bias")}
    groups.destroy()
    if dist.get_rank() != 0:
        return None, biases
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f], biases


def _assert_load_adds_up(records, cfg):
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    for r in records:
        assert set(r["expert_load"]) == {"1", "2"}  # layer 0 is dense
        for layer, load in r["expert_load"].items():
            assert len(load) == cfg.model.moe.num_experts
            assert sum(load) + r["dropped_by_layer"][layer] == tokens * cfg.model.moe.top_k, (layer, r)
        assert r["dropped_tokens"] == sum(r["dropped_by_layer"].values())


def test_tiny_moe_trains_and_logs_expert_load(world2, tmp_path):
    """World size 1, dropless: the load sums to tokens * top_k at every layer, and the loss falls."""
    overrides = ["train.steps=15"]
    records, _ = world2.run(_train_metrics, overrides, str(tmp_path / "ws1"), nranks=1)[0]
    _assert_load_adds_up(records, load_config(CONFIG, overrides))
    assert all(r["dropped_tokens"] == 0 and r["aux_loss"] > 0 for r in records)
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.03, losses


def test_ep2_metrics_with_drops_and_bias_in_sync(world2, tmp_path):
    """EP2 with a capacity factor: load + drops = tokens * top_k per layer; aux-loss-free biases agree on
    both ranks (they are updated from the load summed over every rank) and have moved."""
    overrides = ["train.steps=3", "parallel.ep=2", "model.moe.capacity_factor=1.0", "model.moe.router=sigmoid",
                 "model.moe.bias_update_rate=0.01"]
    (records, bias0), (_, bias1) = world2.run(_train_metrics, overrides, str(tmp_path / "ep2"))
    _assert_load_adds_up(records, load_config(CONFIG, overrides))
    assert all(r["dropped_tokens"] > 0 for r in records)
    assert bias0.keys() == bias1.keys() and len(bias0) == 2
    for name in bias0:
        assert torch.equal(bias0[name], bias1[name]) and bias0[name].abs().sum() > 0, name
