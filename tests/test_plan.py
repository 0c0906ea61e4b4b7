"""The layout planner (tools/plan.py): enumeration, dry-run memory, cost-model monotonicity, ranking, CLI."""
import dataclasses

import pytest

from loom.config import load_config
from loom.tools.memory import dry_run, stage_leads
from loom.tools.plan import GIB, DryRuns, enumerate_layouts, format_table, layout_config, main, plan
from loom.tools.plan_costs import HardwareProfile, Layout, estimate

TINY = "launch/configs/models/tiny/mixtral_8x7b.yaml"
TINY_OVERRIDES = ["train.global_batch_size=16"]
MIXTRAL = "launch/configs/models/mixtral_8x7b.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY, TINY_OVERRIDES)


@pytest.fixture(scope="module")
def tiny_layouts(tiny):
    return enumerate_layouts(tiny, 4)


def test_every_enumerated_layout_validates_and_invalid_ones_are_absent(tiny, tiny_layouts):
    assert len(tiny_layouts) > 20
    for lay in tiny_layouts:
        layout_config(tiny, lay).validate(4)
        assert lay.tp * lay.pp * lay.cp * lay.dp == 4
    names = {(lay.tp, lay.pp, lay.vpp, lay.cp, lay.ep) for lay in tiny_layouts}
    assert (1, 1, 1, 1, 4) in names and (1, 2, 1, 1, 2) in names
    # num_kv_heads=1: no tp > 1; 2 layers: no pp 4 and no pp 2 x vpp 2; ep 8 exceeds the 4 ranks.
    assert all(lay.tp == 1 for lay in tiny_layouts)
    assert all(lay.pp <= 2 and lay.vpp == 1 for lay in tiny_layouts)
    assert all(lay.ep <= 4 for lay in tiny_layouts)
    assert {lay.recompute for lay in tiny_layouts} == {"none", "selective", "full"}


def test_memory_is_the_dry_runs(tiny, tiny_layouts):
    lay = next(lay for lay in tiny_layouts if (lay.pp, lay.ep, lay.recompute) == (2, 2, "selective"))
    overrides = TINY_OVERRIDES + lay.overrides()
    reports = [dry_run(TINY, 4, r, overrides) for r in stage_leads(TINY, 4, overrides)]
    expected = max(r.params_bytes + r.grads_bytes + r.optimizer_bytes + r.activations_bytes for r in reports)
    runs = DryRuns(TINY, 4, TINY_OVERRIDES)
    assert runs.memory(layout_config(tiny, lay), lay) == expected
    # The other recompute modes reuse the cached state; only the activation formula differs.
    cached = len(runs.cache)
    full = dataclasses.replace(lay, recompute="full")
    assert runs.memory(layout_config(tiny, full), full) < expected
    assert len(runs.cache) == cached


def _mixtral(lay: Layout):
    cfg = layout_config(load_config(MIXTRAL), lay)
    cfg.validate(lay.tp * lay.pp * lay.cp * lay.dp)
    return cfg


def test_estimate_is_monotone():
    lay = Layout(tp=2, pp=4, vpp=1, cp=2, ep=8, etp=1, dp=8, recompute="selective")
    cfg, base = _mixtral(lay), HardwareProfile()
    t0 = estimate(cfg, lay, base)
    for field in ("intra_node_gbps", "inter_node_gbps"):
        faster = estimate(cfg, lay, dataclasses.replace(base, **{field: getattr(base, field) * 4}))
        assert faster.step_s < t0.step_s
        assert faster.seconds["compute"] == t0.seconds["compute"]
    more = estimate(cfg, lay, dataclasses.replace(base, gpu_tflops=2 * base.gpu_tflops))
    assert more.seconds["compute"] == pytest.approx(t0.seconds["compute"] / 2)
    assert more.step_s < t0.step_s
    # Same microbatches per rank (dp 8), deeper pipeline: a larger bubble share.
    deeper = Layout(tp=1, pp=8, vpp=1, cp=2, ep=8, etp=1, dp=8, recompute="selective")
    t_deep = estimate(_mixtral(deeper), deeper, base)
    assert t_deep.seconds["bubble"] / t_deep.step_s > t0.seconds["bubble"] / t0.step_s
    assert estimate(cfg, lay, dataclasses.replace(base, ep_imbalance=1.5)).step_s > t0.step_s


def test_ranked_layouts_fit(tiny):
    profile, quiet = HardwareProfile(), (lambda *a: None)
    roomy = plan(TINY, 4, 1.0, profile, TINY_OVERRIDES, top=100, log=quiet)
    assert all(ev.status == "fits" for ev in roomy)
    # A budget between one layout's lower bound and its dry-run bytes: only the dry run can reject it.
    edge = max(roomy, key=lambda ev: ev.memory - ev.lower_bound)
    assert edge.memory > edge.lower_bound
    budget = (edge.memory + edge.lower_bound) / 2
    evaluated = plan(TINY, 4, budget / GIB / (1 - profile.memory_headroom), profile, TINY_OVERRIDES, top=100,
                     log=quiet)
    fits = [ev for ev in evaluated if ev.status == "fits"]
    assert fits and all(ev.memory <= budget for ev in fits)
    assert edge.layout not in {ev.layout for ev in fits}
    assert any(ev.status == "too big" for ev in evaluated)
    table = format_table(evaluated, 4, profile, 100)
    assert len(table.splitlines()) == 1 + len(fits)
    assert edge.layout.name + " " not in table


def test_cli_mixtral_64_gpus(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["--model", MIXTRAL, "--gpus", "64", "--gpu-mem-gb", "80", "--top", "3", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if "layout" in line and "MFU" in line)
    rows = lines[header + 1:header + 4]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert all("ep" in r and "%" in r for r in rows)
    assert out.stat().st_size > 0
