"""The MoE benchmark's figures: analytic FLOPs against torch's flop counter, forced-uniform routing,
and bytes counted at the torch.distributed boundary against the layout's theoretical volume."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from loom.config import load_config
from loom.model.batch import PackedBatch
from loom.model.decoder import Transformer
from loom.model.moe import route
from loom.train.flops import attention_pairs, step_flops
from loom.train.loss import lm_head_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIXTRAL = "launch/configs/models/tiny/mixtral_8x7b.yaml"
aten = torch.ops.aten


def _sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def _sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad, q, k, v)


# torch's counter knows the CUDA SDPA kernels; the CPU one gets the same (dense-square) formulas.
CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward}


def _counted(config: str, lens: list[int]):
    cfg = load_config(os.path.join(ROOT, config), ["model.moe.grouped_gemm=false", "model.attn_backend=torch"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (sum(lens),))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens]).int()
    batch = PackedBatch(input_ids=ids, positions=pos, cu_seqlens=cu, max_seqlen=max(lens))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        lm_head_loss(model.lm_head, model.hidden_states(batch), ids).backward()
    return cfg, counter.get_flop_counts()["Global"]


@pytest.mark.parametrize("config", [MIXTRAL, "launch/configs/tiny_moe.yaml"])
def test_analytic_flops_match_the_flop_counter(config):
    lens = [40, 24, 64]
    cfg, counts = _counted(config, lens)
    counted = sum(counts.values())
    model = step_flops(cfg.model, lens, causal=False)  # SDPA computes the masked square
    core = model.forward["attention_core"]
    # Every matmul outside the attention core: exactly forward + 2 x forward.
    assert counts[aten.mm] == model.total - 3 * core
    assert counts[aten._scaled_dot_product_flash_attention_for_cpu] == core
    # Flash-style backward recomputes the scores (2.5 x the forward core, not 2 x): only that differs.
    if config == MIXTRAL:
        assert abs(counted / model.total - 1) < 0.02, (counted, model.total)
    assert counted - model.total == pytest.approx(0.5 * core)


def test_causal_attention_counts_the_pairs_it_needs():
    assert attention_pairs([3, 1]) == 6 + 1 and attention_pairs([3, 1], causal=False) == 9 + 1
    cfg = load_config(os.path.join(ROOT, MIXTRAL))
    causal, square = step_flops(cfg.model, [64, 64]), step_flops(cfg.model, [64, 64], causal=False)
    assert causal.forward["attention_core"] / square.forward["attention_core"] == pytest.approx(65 / 128)
    # Dropped assignments cost nothing; recompute adds forward work.
    half = step_flops(cfg.model, [64, 64], assignments={"0": 128, "1": 128})
    assert half.forward["experts"] == causal.forward["experts"] / 2
    full, selective = (step_flops(cfg.model, [64, 64], recompute=r) for r in ("full", "selective"))
    assert full.total - causal.total == causal.forward_total - causal.forward["lm_head"]
    assert selective.total - causal.total == causal.forward["attention_core"]


def test_forced_balanced_routing_is_uniform():
    cfg = load_config(os.path.join(ROOT, MIXTRAL), ["model.moe.force_balanced_routing=true"]).model.moe
    logits = torch.randn(96, cfg.num_experts) * 5
    r = route(logits, cfg)
    load = torch.bincount(r.experts.reshape(-1), minlength=cfg.num_experts)
    assert load.tolist() == [96 * cfg.top_k // cfg.num_experts] * cfg.num_experts
    assert all(len(set(row)) == cfg.top_k for row in r.experts.tolist())
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(96))  # still the router's renormalised weights


BENCH_LAYOUTS = {"ep2_dp4": (MIXTRAL, ["parallel.ep=2"]),
                 # TP with SP, ring CP and EP folded over dp x cp: every collective kind
                 "tp2_cp2_ep2": ("launch/configs/tiny_moe.yaml", ["parallel.tp=2", "parallel.sp=true",
                                                                  "parallel.cp=2", "parallel.ep=2"]),
                 # interleaved PP with a tied embedding: its gradient all-reduce over the two end stages,
                 # and p2p per virtual stage
                 "pp2_vpp2_tied_ep2": ("launch/configs/tiny_moe.yaml", [
                     "parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved", "model.num_layers=4",
                     "model.tie_embeddings=true", "parallel.ep=2"])}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(BENCH_LAYOUTS))
def test_bench_moe_on_four_ranks(tmp_path, layout):
    config, overrides = BENCH_LAYOUTS[layout]
    run_dir = tmp_path / "bench"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
           "tools/bench_moe.py", "--config", config, "--steps", "2", "--warmup", "1", *overrides,
           "model.attn_backend=torch", "train.global_batch_size=8", f"train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_PG_TIMEOUT_S": "120"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in ("step time", "tokens/s per rank", "model TFLOP/s per rank", "MFU", "peak memory per rank",
                "expert load max/mean", "expert load CV", "EP rank load max/mean", "dropped", "aux loss",
                "all-to-all MiB", "reduce-scatter MiB", "all-gather MiB", "all-reduce MiB", "p2p MiB"):
        assert row in proc.stdout, row
    result = json.loads((run_dir / "bench.json").read_text())
    balanced = result["routing"]["balanced"]
    for kind, row in balanced["traffic"].items():  # every timed step, the world's bytes
        if row["theory"]:
            assert 0.99 <= row["ratio"]["min"] and row["ratio"]["max"] <= 1.01, (kind, row)
        else:
            assert row["counted"]["max"] == 0, (kind, row)
    assert balanced["traffic"]["all-to-all"]["theory"] > 0 and balanced["traffic"]["all-gather"]["theory"] > 0
    for record in balanced["records"]:
        for layer, load in record["expert_load"].items():
            assert len(set(load)) == 1, (layer, load)
    for layer, ranks in balanced["summary"]["ep_rank_load"].items():
        assert len(set(ranks)) == 1 and len(ranks) == 2
    real = result["routing"]["real"]["summary"]
    assert max(s["max"] for s in real["expert_max_over_mean"].values()) > 1.0  # the learned router is not uniform
    for name in ("step_time.png", "ep_rank_load.png", "expert_load_real_layer1.png", "expert_load_balanced_layer1.png"):
        assert (run_dir / name).stat().st_size > 5000, name
