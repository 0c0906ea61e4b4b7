"""Pipeline parallelism against world size 1: 5 fp32 steps on identical data, every schedule and
its combinations with TP+SP, DP, CP and tied embeddings; and every rank logs the true loss."""
import json
import os

import numpy as np
import pytest

from tests.parity import assert_parity, params, train_layout, world1_references

CONFIG = "launch/configs/tiny_dense.yaml"
# Four layers: PP4 and PP2 x VPP2 get one layer per virtual stage. 8 microbatches per rank
# (4 under DP2).
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_pipeline", "model.attn_backend=torch", "model.num_layers=4"]
PP2 = ["parallel.pp=2"]
ZB1 = ["parallel.pp_schedule=zb1"]

LAYOUTS = {
    "pp2_1f1b": (2, PP2),
    "pp4_1f1b": (4, ["parallel.pp=4"]),
    "pp2_vpp2_interleaved": (2, PP2 + ["parallel.vpp=2", "parallel.pp_schedule=interleaved"]),
    "pp2_tp2_sp_dp2": (8, PP2 + ["parallel.tp=2", "parallel.sp=true"]),
    "pp2_cp2": (4, PP2 + ["parallel.cp=2"]),
    "pp2_tied": (2, PP2 + ["model.tie_embeddings=true"]),
    "pp2_gpipe_uneven": (2, PP2 + ["parallel.pp_schedule=gpipe", "parallel.pp_layout=[1,3]"]),
    "pp2_zb1": (2, PP2 + ZB1),
    "pp2_zb1_tp2_sp": (4, PP2 + ZB1 + ["parallel.tp=2", "parallel.sp=true"]),
    # Two middle stages, each receiving from one neighbour and sending to the other while W trails B.
    "pp4_zb1_tp2_sp": (8, ["parallel.pp=4"] + ZB1 + ["parallel.tp=2", "parallel.sp=true"]),
}
MODEL_KEYS = ("model.", "train.global_batch_size", "train.micro_batch_size")


@pytest.fixture(scope="module")
def references(world8):
    return world1_references(world8, CONFIG, BASE, MODEL_KEYS)


@pytest.mark.parametrize("layout", params(LAYOUTS, slow=("pp2_tp2_sp_dp2", "pp2_zb1_tp2_sp", "pp4_zb1_tp2_sp")))
def test_pipeline_parity(world8, references, layout):
    nranks, overrides = LAYOUTS[layout]
    ref = references(overrides)
    out = world8.run(train_layout, CONFIG, BASE + overrides, nranks=nranks)[0]
    assert_parity(ref, out)
    if "model.tie_embeddings=true" in overrides:  # the first stage's embedding and the last's head stay one weight
        np.testing.assert_array_equal(out["params"]["embed.weight"], out["params"]["lm_head.weight"])


@pytest.mark.slow
def test_zb1_matches_1f1b_under_dp(world8, references):
    """PP2 x DP2: the weight gradients that W computes late reach the DP-reduced buckets as 1F1B's do."""
    one_f_one_b = world8.run(train_layout, CONFIG, BASE + PP2, nranks=4)[0]
    zb1 = world8.run(train_layout, CONFIG, BASE + PP2 + ZB1, nranks=4)[0]
    assert_parity(one_f_one_b, zb1)
    assert_parity(references(PP2), zb1)


def _fit(run_dir, overrides):
    import torch.distributed as dist

    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(os.path.join(ROOT, CONFIG), [*BASE, "train.steps=5", f"train.run_dir={run_dir}", *overrides])
    groups = build_groups(cfg)
    history = Trainer(cfg, groups).fit()
    groups.destroy()
    return dist.get_rank(), [r["loss"] for r in history]


def test_every_rank_logs_the_true_loss(world8, references, tmp_path):
    """PP2 x VPP2 x DP2: each rank's metrics file holds the world-size-1 loss, stages without the head included."""
    overrides = PP2 + ["parallel.vpp=2", "parallel.pp_schedule=interleaved"]
    ref = np.array(references(overrides)["losses"])
    world8.run(_fit, str(tmp_path), overrides, nranks=4)
    for rank in range(4):
        name = "metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl"
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        losses = np.array([r["loss"] for r in records])
        assert [r["step"] for r in records] == [1, 2, 3, 4, 5], name
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f"{name} does not log the true loss")


def _aux_losses(schedule, vpp):
    """A linear pipeline whose every stage adds an auxiliary loss of its activations, as MoE does."""
    import torch
    import torch.distributed as dist

    from loom.parallel.pipeline import PipelineExecutor, StageOutput
    from loom.parallel.pipeline_schedule import build_table

    rank, pp, m = dist.get_rank(), dist.get_world_size(), 4
    torch.manual_seed(0)  # identical on every rank
    weights = [torch.randn(4, 4, requires_grad=True) for _ in range(pp * vpp)]
    inputs = [torch.randn(3, 4) for _ in range(m)]

    def aux_of(h):
        return 0.01 * h.pow(2).mean()

    ref_loss, ref_aux = 0.0, 0.0  # the whole pipeline in one process
    for x in inputs:
        for w in weights:
            x = x @ w
            aux = aux_of(x)
            ref_aux = ref_aux + aux
        ref_loss = ref_loss + x.sum()
    (ref_loss + ref_aux).backward()
    expected = {s: w.grad.clone() for s, w in enumerate(weights)}
    for w in weights:
        w.grad = None

    def forward(chunk, x, mb):
        stage = chunk * pp + rank
        out = (inputs[mb] if x is None else x) @ weights[stage]
        aux = aux_of(out)
        if stage == pp * vpp - 1:
            return StageOutput(None, out.sum() + aux, {"loss_sum": out.sum().detach(), "aux": aux.detach()})
        return StageOutput(out, aux, {"aux": aux.detach()})

    # The gradient buckets reduce a weight once it has accumulated with sync on: exactly once, the
    # microbatch that makes it final (a W under zb1, which defers W passes past later B passes).
    syncing, final = [False], {s: 0 for s in range(pp * vpp)}
    for s, w in enumerate(weights):
        w.register_post_accumulate_grad_hook(lambda _, s=s: final.__setitem__(s, final[s] + syncing[0]))

    def grad_sync(last):
        syncing[0] = last

    executor = PipelineExecutor(dist.group.WORLD, torch.device("cpu"))
    stats = executor.run(build_table(schedule, pp, vpp, m, rank), list(range(m)), forward,
                         lambda mb: ((3, 4), torch.float32), grad_sync, stat_names=("loss_sum", "aux"))
    torch.testing.assert_close(stats["aux"], ref_aux.detach())
    torch.testing.assert_close(stats["loss_sum"], ref_loss.detach())
    for chunk in range(vpp):
        stage = chunk * pp + rank
        torch.testing.assert_close(weights[stage].grad, expected[stage])
        assert final[stage] == 1, f"stage {stage} accumulated {final[stage]} times with sync on"
    return True


@pytest.mark.parametrize("schedule, vpp", [("1f1b", 1), ("interleaved", 2), ("zb1", 1)])
def test_auxiliary_losses_of_every_stage_and_microbatch(world8, schedule, vpp):
    """Stage outputs carry an extra objective and stats: summed over the pipeline, backpropagated in place."""
    assert world8.run(_aux_losses, schedule, vpp, nranks=2) == [True, True]


def _bf16_boundary():
    """Stages computing in fp32 whose boundary is bf16: what crosses is bf16, both ways."""
    import torch
    import torch.distributed as dist

    from loom.parallel.pipeline import PipelineExecutor, StageOutput
    from loom.parallel.pipeline_schedule import build_table

    rank, m = dist.get_rank(), 2
    torch.manual_seed(0)
    weights = [torch.randn(4, 4, requires_grad=True) for _ in range(2)]
    inputs = [torch.randn(3, 4) for _ in range(m)]
    ref = sum((x @ weights[0]).to(torch.bfloat16).float() @ weights[1] for x in inputs).sum()
    ref.backward()
    expected = weights[rank].grad.clone()
    weights[rank].grad = None

    def forward(chunk, x, mb):
        if rank == 0:
            return StageOutput(inputs[mb] @ weights[0], None, {})
        out = (x.float() @ weights[1]).sum()
        return StageOutput(None, out, {"loss_sum": out.detach()})

    crossed = []
    p2p = PipelineExecutor._p2p

    def spy(op, tensor, peer, group):
        crossed.append(tensor.dtype)
        return p2p(op, tensor, peer, group)

    PipelineExecutor._p2p = staticmethod(spy)
    try:
        executor = PipelineExecutor(dist.group.WORLD, torch.device("cpu"))
        executor.run(build_table("1f1b", 2, 1, m, rank), list(range(m)), forward,
                     lambda mb: ((3, 4), torch.bfloat16))
    finally:
        PipelineExecutor._p2p = staticmethod(p2p)
    assert crossed == [torch.bfloat16] * 2 * m, crossed
    torch.testing.assert_close(weights[rank].grad, expected)
    return True


def test_boundaries_travel_in_the_compute_dtype(world8):
    assert world8.run(_bf16_boundary, nranks=2) == [True, True]
