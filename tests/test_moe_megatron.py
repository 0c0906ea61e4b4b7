"""Loom's router and balancing losses against megatron-core's pure reference functions.

Where the definitions coincide the two must agree on the same fp32 logits: the chosen experts, the
combine weight of each (token, expert), the Switch aux loss (per microbatch and per sequence), the
z-loss, their gradients, and the aux-loss-free bias update. Where Loom differs on purpose the tests
pin the exact difference:
- group scoring: Loom ranks a group by the sum of its top-2 scores (DeepSeek-V3's reference), on the
  probabilities; Megatron by the sum of its top-(top_k // topk_group) scores, and on the raw logits
  when softmax comes after the top-k;
- the aux loss counts c_e: Loom counts the real assignments (after the selection bias and the group
  limit, as DeepSeek-V3's reference); Megatron an unbiased, unlimited top-k of the scores.
"""
import math
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
    mu = pytest.importorskip(
        "megatron.core.transformer.moe.moe_utils",
        reason="megatron-core is an optional test extra (tests/run.sh installs it)",
    )

from loom.config import MoEConfig
from loom.model.moe import MoE, Router, route
from loom.parallel.expert_parallel import ShardedBalanceScope

T, E = 64, 8
RTOL = 1e-6


def _logits(t=T, e=E, seed=0, requires_grad=False):
    x = torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * 2
    return x.requires_grad_(requires_grad)


def _cfg(**kw):
    cfg = MoEConfig(num_experts=kw.pop("num_experts", E), **kw)
    cfg.validate()
    return cfg


def _dense(routing, e):
    """Loom's ``[T, k]`` routing as Megatron's ``[T, E]`` (routing_probs, routing_map): order-free."""
    t = routing.experts.shape[0]
    probs = torch.zeros(t, e).scatter(1, routing.experts, routing.weights.detach())
    chosen = torch.zeros(t, e, dtype=torch.bool).scatter(1, routing.experts, True)
    return probs, chosen


def _megatron(logits, cfg, bias=None, pre_softmax=None):
    """Megatron's routing of ``logits`` under the settings that mean what ``cfg`` means to Loom."""
    if pre_softmax is None:
        # softmax-then-top-k keeps the probabilities; top-k-then-softmax renormalises over the k.
        # At k=1 Loom keeps the probability unless norm_top1_prob asks for HF's 1.0; Megatron's
        # config demands pre-softmax there (a softmax over one logit gives the router no gradient),
        # but its function computes the 1.0 too.
        pre_softmax = not (cfg.norm_topk_prob and (cfg.top_k > 1 or cfg.norm_top1_prob))
    groups = cfg.n_group > 1
    return mu.topk_routing_with_score_function(
        logits.detach(),
        cfg.top_k,
        use_pre_softmax=pre_softmax,
        num_groups=cfg.n_group if groups else None,
        group_topk=cfg.topk_group if groups else None,
        scaling_factor=cfg.routed_scaling_factor,
        score_function=cfg.router,
        expert_bias=bias,
    )


def _assert_same_routing(loom, megatron_probs, megatron_map):
    probs, chosen = _dense(loom, megatron_map.shape[1])
    assert torch.equal(chosen, megatron_map)
    torch.testing.assert_close(probs, megatron_probs, rtol=RTOL, atol=0.0)


# ----------------------------------------------------------------------------- routing: coincides


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_softmax_routing_matches_megatron(top_k, norm, scale):
    cfg = _cfg(top_k=top_k, norm_topk_prob=norm, routed_scaling_factor=scale)
    logits = _logits()
    _assert_same_routing(route(logits, cfg), *_megatron(logits, cfg))


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_softmax_top1_renormalised_matches_megatron_post_softmax(scale):
    cfg = _cfg(top_k=1, norm_top1_prob=True, routed_scaling_factor=scale)
    logits = _logits()
    _assert_same_routing(route(logits, cfg), *_megatron(logits, cfg))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_sigmoid_routing_with_expert_bias_matches_megatron(top_k, scale, bias):
    """Megatron's sigmoid router renormalises over k > 1 choices and keeps a single score: Loom's
    norm_topk_prob=True without norm_top1_prob (with it, Loom's k=1 weight would be 1.0)."""
    cfg = _cfg(top_k=top_k, router="sigmoid", routed_scaling_factor=scale)
    logits = _logits(seed=1)
    b = torch.randn(E, generator=torch.Generator().manual_seed(2)) * 0.3 if bias else None
    _assert_same_routing(route(logits, cfg, b), *_megatron(logits, cfg, b))


@pytest.mark.parametrize("top_k", [2, 4])
def test_sigmoid_without_renormalisation_keeps_megatron_ratios(top_k):
    """Megatron has no unnormalised sigmoid mode: the choices and the ratios of the weights must still agree."""
    cfg = _cfg(top_k=top_k, router="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5)
    logits = _logits(seed=3)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(4)) * 0.3
    r = route(logits, cfg, bias)
    probs, chosen = _dense(r, E)
    m_probs, m_map = _megatron(logits, cfg, bias)
    assert torch.equal(chosen, m_map)
    torch.testing.assert_close(probs, torch.sigmoid(logits) * chosen * 2.5, rtol=RTOL, atol=0.0)
    torch.testing.assert_close(probs / probs.sum(-1, keepdim=True) * 2.5, m_probs, rtol=RTOL, atol=0.0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_group_limited_routing_matches_megatron(scale, bias):
    """top_k // topk_group == 2 (DeepSeek-V3's 8 // 4): Megatron's group score is then the top-2 sum too."""
    cfg = _cfg(num_experts=16, top_k=4, router="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=scale)
    logits = _logits(e=16, seed=5)
    b = torch.randn(16, generator=torch.Generator().manual_seed(6)) * 0.3 if bias else None
    r = route(logits, cfg, b)
    _assert_same_routing(r, *_megatron(logits, cfg, b))
    assert all(len(set(groups)) <= 2 for groups in (r.experts // 4).tolist())


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_group_limited_routing_matches_megatron_pre_softmax(norm):
    """Loom ranks groups on the probabilities, so the oracle is Megatron's pre-softmax router (see
    test_softmax_group_scores_use_probabilities_not_logits); renormalising its weights over the k
    choices gives the norm_topk_prob=True weights."""
    cfg = _cfg(num_experts=16, top_k=4, n_group=4, topk_group=2, norm_topk_prob=norm, routed_scaling_factor=2.5)
    logits = _logits(e=16, seed=7)
    m_probs, m_map = _megatron(logits, cfg, pre_softmax=True)
    if norm:
        m_probs = m_probs / m_probs.sum(-1, keepdim=True) * 2.5
    _assert_same_routing(route(logits, cfg), m_probs, m_map)


# ----------------------------------------------------------------------------- routing: differs on purpose


def _logit(p):
    p = torch.tensor(p)
    return torch.log(p / (1 - p))


def test_group_score_is_the_top2_sum_not_megatrons_top_k_over_topk_group():
    """Loom: score(g) = sum of g's top-2 scores, whatever top_k and topk_group are (DeepSeek-V3).
    Megatron: score(g) = sum of g's top-(top_k // topk_group) scores; here 2 // 2 = 1, the group max."""
    cfg = _cfg(top_k=2, router="sigmoid", n_group=4, topk_group=2)
    # groups {0,1} {2,3} {4,5} {6,7}: maxima 0.90 0.60 0.85 0.10; top-2 sums 0.95 1.15 0.90 0.20
    scores = [0.90, 0.05, 0.60, 0.55, 0.85, 0.05, 0.10, 0.10]
    logits = _logit(scores).unsqueeze(0)
    grouped = torch.tensor(scores).view(4, 2)
    assert grouped.topk(2, -1).values.sum(-1).topk(2).indices.tolist() == [1, 0]  # Loom keeps {2,3}, {0,1}
    assert grouped.topk(1, -1).values.sum(-1).topk(2).indices.tolist() == [0, 2]  # Megatron keeps {0,1}, {4,5}
    assert sorted(route(logits, cfg).experts[0].tolist()) == [0, 2]
    _, m_map = _megatron(logits, cfg)
    assert m_map[0].nonzero().flatten().tolist() == [0, 4]


def test_softmax_group_scores_use_probabilities_not_logits():
    """With softmax after the top-k Megatron ranks groups by sums of raw logits; Loom (like Megatron's
    pre-softmax router) by sums of probabilities, the scale its top-k is taken on."""
    cfg = _cfg(top_k=2, n_group=4, topk_group=1)
    logits = torch.tensor([[3.0, -10.0, 2.5, 2.0, -5.0, -5.0, -5.0, -5.0]])
    # probabilities: e^3 + e^-10 = 20.09 > e^2.5 + e^2 = 19.57; logits: -7 < 4.5
    assert sorted(route(logits, cfg).experts[0].tolist()) == [0, 1]
    _, pre = _megatron(logits, cfg, pre_softmax=True)
    _, post = _megatron(logits, cfg, pre_softmax=False)
    assert pre[0].nonzero().flatten().tolist() == [0, 1]
    assert post[0].nonzero().flatten().tolist() == [2, 3]


# ----------------------------------------------------------------------------- balancing losses


def _moe(cfg, scope=None):
    return MoE(4, cfg, intermediate=4, scope=scope)  # balance_losses reads only the logits and the routing


def _loom_losses(logits, cfg, bias=None, scope=None):
    moe = _moe(cfg, scope)
    aux, z = moe.balance_losses(logits, route(logits, cfg, bias), None)
    return aux, z


def _megatron_aux(logits, cfg, coeff):
    """Megatron's router ``aux_loss`` type on one microbatch (its tp_cp group of size 1)."""
    routing_map, scores = mu.compute_routing_scores_for_aux_loss(logits, cfg.top_k, cfg.router)
    return mu.switch_load_balancing_loss_func(
        scores, routing_map.sum(0), logits.shape[0], cfg.top_k, cfg.num_experts, coeff)


def _assert_same_value_and_grad(loom, megatron, leaf):
    (g_loom,) = torch.autograd.grad(loom, leaf)
    (g_megatron,) = torch.autograd.grad(megatron, leaf)
    assert math.isclose(loom.item(), megatron.item(), rel_tol=RTOL)
    torch.testing.assert_close(g_loom, g_megatron, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_microbatch_aux_loss_matches_megatron(router, top_k):
    """Loom's ``global`` unit is one microbatch: Megatron's ``aux_loss`` type, E/(k T^2) sum_e c_e P_e
    (not its ``global_aux_loss``, whose running DP-wide counts depend on dp)."""
    cfg = _cfg(top_k=top_k, router=router, aux_loss_coeff=0.01, aux_loss_type="global")
    logits = _logits(seed=8, requires_grad=True)
    aux, _ = _loom_losses(logits, cfg)
    _assert_same_value_and_grad(aux, _megatron_aux(logits, cfg, 0.01), logits)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_sequence_aux_loss_matches_megatron(router):
    """Megatron's ``seq_aux_loss``: [s, b] tokens, experts widened to b*E so each sequence counts
    apart, then divided by b; Loom's ``seq`` units on the same sequences in [b, s] order."""
    s, b, k, coeff = 16, 3, 2, 0.01
    cfg = _cfg(top_k=k, router=router, aux_loss_coeff=coeff, aux_loss_type="seq")
    logits = _logits(t=b * s, seed=9, requires_grad=True)
    scope = ShardedBalanceScope(seq_len=s, sequences_per_step=b, micro_batch_size=b, sp_group=None, shard_group=None)
    aux, _ = _loom_losses(logits, cfg, scope=scope)

    sb = logits.view(b, s, E).transpose(0, 1).reshape(s * b, E)  # Megatron's sequence-major layout
    routing_map, scores = mu.compute_routing_scores_for_aux_loss(sb, k, router)
    scores, routing_map = scores.reshape(s, -1), routing_map.reshape(s, -1)
    expected = mu.switch_load_balancing_loss_func(scores, routing_map.sum(0), s, k, E, coeff) / b
    _assert_same_value_and_grad(aux, expected, logits)


def test_z_loss_matches_megatron():
    cfg = _cfg(top_k=2, z_loss_coeff=1e-3)
    logits = _logits(seed=10, requires_grad=True)
    aux, z = _loom_losses(logits, cfg)
    assert aux == 0.0
    _assert_same_value_and_grad(z, mu.z_loss_func(logits, 1e-3), logits)


@pytest.mark.parametrize("limit", ["bias", "groups"])
def test_aux_loss_counts_the_real_assignments_not_megatrons_unbiased_top_k(limit):
    """Loom: c_e counts the experts each token is actually sent to, after the selection bias or the
    group limit (DeepSeek-V3's reference counts its topk_idx the same way). Megatron: c_e counts a
    separate top-k of the unbiased, ungrouped scores. P_e is the same in both."""
    coeff = 0.01
    logits = _logits(e=16, seed=11, requires_grad=True)
    if limit == "bias":
        cfg = _cfg(num_experts=16, top_k=4, router="sigmoid", aux_loss_coeff=coeff)
        bias = torch.zeros(16)
        bias[:4] = 1.0  # pulls every token to experts 0-3
    else:
        cfg = _cfg(num_experts=16, top_k=4, n_group=4, topk_group=2, aux_loss_coeff=coeff)
        bias = None
    aux, _ = _loom_losses(logits, cfg, bias)

    _, real_map = _megatron(logits, cfg, bias, pre_softmax=True)
    assert torch.equal(_dense(route(logits, cfg, bias), 16)[1], real_map)
    _, scores = mu.compute_routing_scores_for_aux_loss(logits, cfg.top_k, cfg.router)
    on_real = mu.switch_load_balancing_loss_func(scores, real_map.sum(0), T, 4, 16, coeff)
    _assert_same_value_and_grad(aux, on_real, logits)
    megatron = _megatron_aux(logits, cfg, coeff)
    assert not math.isclose(aux.item(), megatron.item(), rel_tol=1e-2)


def test_bias_update_matches_megatron(monkeypatch):
    """Aux-loss-free balancing: bias += rate * sign(mean load - load), on one rank."""
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_tensor_and_data_parallel_group", lambda **kw: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, group=None: None)
    load = torch.tensor([10.0, 0.0, 5.0, 5.0, 7.0, 3.0, 1.0, 9.0])  # mean 5: two experts sit on it
    bias = torch.randn(E, generator=torch.Generator().manual_seed(12))
    router = Router(4, E, correction_bias=True)
    router.e_score_correction_bias.copy_(bias)
    router.update_bias(load, rate=1e-3)
    expected = mu.get_updated_expert_bias(load.clone(), bias.clone(), 1e-3)
    torch.testing.assert_close(router.e_score_correction_bias, expected, rtol=RTOL, atol=0.0)
