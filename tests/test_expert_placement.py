"""Expert placement: a balanced plan from recorded load moves experts between EP ranks without
changing the math, evens out the tokens each rank receives, and checkpoints stay in logical order."""
import json
import os

import numpy as np
import pytest

from loom.config import ConfigError
from loom.parallel.expert_parallel import read_placement_plan
from tests.parity import LOSS_RTOL, RTOL, assert_close_tensors
from loom.tools.place_experts import balanced_placement, imbalance, main as place_experts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "launch/configs/models/tiny/mixtral_8x7b.yaml"  # 8 experts, top-2, every layer MoE
# A deliberately skewed router: the selection bias pulls tokens towards the low experts, which the
# contiguous placement puts together on EP rank 0. A tiny update rate keeps the bias (and its buffer).
SKEW = [0.04, 0.03, 0.02, 0.01, 0.0, 0.0, 0.0, 0.0]
BASE = ["train.dtype=fp32", "model.attn_backend=torch", "checkpoint.resume=none", "train.global_batch_size=8",
        "model.moe.bias_update_rate=1e-12", "parallel.ep=4", "train.steps=4", "train.log_interval=100"]


def skewed_run(overrides: list[str]):
    """Train under ``overrides`` with the skewed router; rank 0 returns the records, the final parameters
    (whole, logical order) and the rows each EP rank received per layer, counted in the dispatcher."""
    import torch
    import torch.distributed as dist

    from loom.config import load_config
    from loom.model import surface
    from loom.parallel.inspect import full_state_dict
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, CONFIG), BASE + overrides)
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    received = {}
    for i, moe in surface.routed_layers(trainer.model).items():
        moe.gate.e_score_correction_bias.copy_(torch.tensor(SKEW))
        plan = moe.dispatcher._plan

        def counting(counts, plan=plan, i=i):
            out = plan(counts)
            received[i] = received.get(i, 0) + int(out.local_counts.sum())
            return out

        moe.dispatcher._plan = counting
    records = trainer.fit()
    params = {k: v.numpy() for k, v in full_state_dict(trainer.model, groups).items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (groups.ep_rank, groups.edp_rank, received))
    groups.destroy()
    if dist.get_rank() != 0:
        return None
    return {"records": records, "params": params, "received": every}


def _rank_load(out) -> dict[int, list[int]]:
    """Rows received per EP rank and layer, summed over the expert-data-parallel replicas."""
    loads = {}
    for ep_rank, _, received in out["received"]:
        for layer, rows in received.items():
            loads.setdefault(layer, [0] * 4)[ep_rank] += rows
    return loads


@pytest.fixture(scope="module")
def runs(world4, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placement")
    before = world4.run(skewed_run, [f"train.run_dir={tmp / 'contiguous'}"])[0]
    plan = tmp / "plan.json"
    assert place_experts([str(tmp / "contiguous"), "--out", str(plan)]) == 0
    balanced = [f"train.run_dir={tmp / 'balanced'}", "parallel.expert_placement=balanced",
                f"parallel.expert_placement_plan={plan}", "checkpoint.save_interval=2"]
    after = world4.run(skewed_run, balanced)[0]
    return tmp, json.loads(plan.read_text()), before, after


@pytest.mark.slow
def test_balanced_placement_keeps_the_math_and_evens_the_load(runs):
    _, plan, before, after = runs
    assert any(p != [[2 * r, 2 * r + 1] for r in range(4)] for p in plan["layers"].values()), plan["layers"]
    for a, b in zip(before["records"], after["records"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(a["loss"]), (a["loss"], b["loss"])
        assert a["expert_load"] == b["expert_load"]
    assert_close_tensors("params", before["params"], after["params"], RTOL)
    old, new = _rank_load(before), _rank_load(after)
    print("\n| layer | EP-rank rows received (4 steps) contiguous | max/mean | balanced | max/mean |")
    for layer in old:
        ratio = [max(x) / np.mean(x) for x in (old[layer], new[layer])]
        print(f"| {layer} | {old[layer]} | {ratio[0]:.3f} | {new[layer]} | {ratio[1]:.3f} |")
        assert sum(old[layer]) == sum(new[layer])
        assert ratio[0] > 1.3 and ratio[1] < ratio[0] - 0.2, (layer, old[layer], new[layer])


@pytest.mark.slow
def test_resume_under_another_placement(world4, runs):
    """Saved at step 2 under the balanced plan, resumed under the contiguous placement: the same run."""
    tmp, _, before, _ = runs
    resumed = world4.run(skewed_run, [f"train.run_dir={tmp / 'resumed'}",
                                      f"checkpoint.resume={tmp / 'balanced' / 'checkpoints' / 'step_00000002'}"])[0]
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    for a, b in zip(before["records"][2:], resumed["records"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(a["loss"]), (a["loss"], b["loss"])
    assert_close_tensors("params", before["params"], resumed["params"], RTOL)


def test_greedy_plan_evens_a_skewed_load():
    load = [90, 80, 70, 60, 10, 10, 5, 5]
    contiguous = [[0, 1], [2, 3], [4, 5], [6, 7]]
    plan = balanced_placement(load, 4)
    assert sorted(e for g in plan for e in g) == list(range(8)) and all(len(g) == 2 for g in plan)
    assert imbalance(load, contiguous) == pytest.approx(170 / 82.5)
    assert imbalance(load, plan) == pytest.approx(95 / 82.5)  # (90+5) (80+10) (70+10) (60+5): the optimum


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{", "not readable JSON"),
    ({"num_experts": 8, "ep": 2, "layers": {}}, "ep=2"),
    ({"num_experts": 8, "ep": 4, "layers": {"7": [[0, 1], [2, 3], [4, 5], [6, 7]]}}, "layer '7'"),
    ({"num_experts": 8, "ep": 4, "layers": {"0": [[0, 1], [2, 3], [4, 5], [6, 6]]}}, "every expert"),
])
def test_bad_plans_name_the_file(tmp_path, content, message):
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message) as e:
        read_placement_plan(path, 8, 4, [0, 1])
    assert str(path) in str(e.value)
