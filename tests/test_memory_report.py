"""The memory report: Megatron's formula, what a rank holds, and dry runs of large layouts on this machine."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.parity import ROOT, params


def test_megatron_bytes_per_param():
    from loom.train.memory import megatron_bytes_per_param

    total = lambda *args: sum(megatron_bytes_per_param(*args).values())  # noqa: E731
    assert total("fp32", False, 8) == 16 and total("bf16", False, 8) == 18
    assert total("bf16", True, 8) == 6 + 12 / 8 and total("fp32", True, 4) == 8 + 8 / 4


def test_tensors_bytes_counts_a_buffer_once():
    from loom.train.memory import tensors_bytes

    flat = torch.zeros(100)
    assert tensors_bytes([flat[:10], flat[10:50].view(5, 8), flat]) == 400
    meta = [torch.empty(3, 4, device="meta", dtype=torch.bfloat16)] * 2
    assert tensors_bytes(meta) == 24


def _cfg(*overrides):
    from loom.config import load_config

    return load_config(os.path.join(ROOT, "launch/configs/tiny_dense.yaml"), list(overrides))


def test_activation_formula_by_hand():
    """tiny_dense: h 64, F 128, 4 heads / 2 kv (g = 1/2), s 64, b 1, fp32 (x2), 2 layers:
    per layer 8 (norm, attention, MLP inputs) + 4 + 4g (Q, K, V, core output) + 6F/h = 8 + 6 + 12 = 26."""
    from loom.parallel.mesh import ParallelDims
    from loom.train.memory import activation_bytes

    sbh = 64 * 1 * 64
    assert activation_bytes(_cfg(), ParallelDims(), [0, 1], 0) == 2 * 26 * sbh * 2
    tp2 = ParallelDims(tp=2)
    assert activation_bytes(_cfg("parallel.tp=2"), tp2, [0, 1], 0) == 2 * (8 + 18 / 2) * sbh * 2
    assert activation_bytes(_cfg("parallel.tp=2", "parallel.sp=true"), tp2, [0, 1], 0) == 2 * 26 / 2 * sbh * 2
    assert activation_bytes(_cfg("train.recompute=full"), ParallelDims(), [0, 1], 0) == 2 * 2 * sbh * 2
    one = activation_bytes(_cfg("train.recompute=full", "train.recompute_layers=1"), ParallelDims(), [0, 1], 0)
    assert one == (2 + 26) * sbh * 2
    # A pipeline's first stage holds pp microbatches under 1F1B.
    pp2 = ParallelDims(pp=2)
    assert activation_bytes(_cfg("parallel.pp=2"), pp2, [0], 0) == 2 * 26 * sbh * 2


def test_moe_selective_recompute_drops_the_expert_products():
    from loom.parallel.mesh import ParallelDims
    from loom.train.memory import activation_units_per_layer

    cfg = _cfg("model.moe.num_experts=4", "model.moe.intermediate_size=64")
    none, selective, full = (activation_units_per_layer(cfg, ParallelDims(), True, m)
                             for m in ("none", "selective", "full"))
    assert none > selective > full == 2


def test_report_round_trips_to_json(tmp_path):
    from loom.parallel.mesh import ParallelDims
    from loom.train.memory import build_report

    report = build_report(cfg=_cfg(), dims=ParallelDims(), rank=0, pp_rank=0, params=[torch.zeros(10)],
                          grads=[torch.zeros(10)], optimizer_bytes=80, dense_params=10, expert_params=0,
                          layers_on_rank=[0, 1])
    data = json.loads(report.write(tmp_path).read_text())
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"):
        assert data[key] == getattr(report, key) and key in data["formula"]
    # The formula counts tiny_dense from its architecture, not the 10 elements this rank claims to hold.
    assert data["params_bytes"] == 40 and data["formula"]["params_bytes"] > 40 and "optimizer" in report.format()
    assert data["formula"]["held_dense_params"] == 10 and "10 held" in report.count_mismatch()


def _dry_run(*args) -> tuple[dict, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools/memory.py"), "--json", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


DRY_RUNS = {"llama3_70b_rank0": ("llama3_70b", 64, ["--rank", "0"]),
            "llama3_70b_last_stage": ("llama3_70b", 64, ["--rank", "48"]),
            "mixtral_8x7b_most_loaded": ("mixtral_8x7b", 64, ["--most-loaded"]),
            "qwen3_235b_a22b_most_loaded": ("qwen3_235b_a22b", 256, ["--most-loaded"])}


@pytest.mark.parametrize("run", params(sorted(DRY_RUNS), slow=[k for k in DRY_RUNS if k != "llama3_70b_rank0"]))
def test_dry_run_agrees_with_megatron(run):
    """Any rank of a 64- or 256-GPU layout, built from the real shard shapes on the meta device, in
    seconds: parameter, gradient and optimizer bytes within 2% of Megatron's formula."""
    name, world, which = DRY_RUNS[run]
    report, seconds = _dry_run("--config", f"launch/configs/models/{name}.yaml", "--world", str(world), *which)
    print(f"{run}: rank {report['rank']}, {seconds:.1f} s, GiB params {report['params_bytes'] / 2**30:.2f} "
          f"grads {report['grads_bytes'] / 2**30:.2f} optimizer {report['optimizer_bytes'] / 2**30:.2f} "
          f"activations {report['activations_bytes'] / 2**30:.2f}")
    assert seconds < 60
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
        assert abs(report[key] / report["formula"][key] - 1) <= 0.02, (key, report[key], report["formula"][key])
    assert report["activations_source"] == "formula" and report["activations_bytes"] > 0
    f = report["formula"]  # the formula's counts come from the architecture, and the shards match them
    assert f["params_source"] == "architecture", f
    assert (f["held_dense_params"], f["held_expert_params"]) == (f["dense_params"], f["expert_params"]), f


COUNTED = {  # (config, world, rank, overrides): every kind of shard, and the stage parts
    "tp2_sp": ("tiny_dense", 2, 1, ["parallel.tp=2", "parallel.sp=true"]),
    "tp2_pp2_last": ("tiny_dense", 4, 3, ["parallel.tp=2", "parallel.pp=2"]),
    "tied_pp2_first": ("tiny_dense", 2, 0, ["parallel.pp=2", "model.tie_embeddings=true"]),
    "tied_world1": ("tiny_dense", 1, 0, ["model.tie_embeddings=true", "model.qk_norm=true",
                                         "model.attention_bias=true"]),
    "moe_tp2_ep2": ("tiny_moe", 4, 3, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    "moe_ep2_etp1_vpp": ("tiny_moe", 8, 5, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=1", "parallel.pp=2",
                                           "parallel.vpp=3", "parallel.pp_schedule=interleaved", "model.num_layers=6"]),
}


def _counted_report(name: str):
    from loom.tools.memory import dry_run

    config, world, rank, overrides = COUNTED[name]
    return dry_run(os.path.join(ROOT, f"launch/configs/{config}.yaml"), world, rank,
                   ["train.run_dir=runs/test_memory_report", *overrides])


@pytest.mark.parametrize("name", sorted(COUNTED))
def test_shards_match_the_architecture_count(name):
    """Each rank's parameters, counted from the architecture and the layout alone (param_count.py), are what
    the rank holds: TP, SP, PP stages (tied or not, interleaved), EP and ETP experts, biases and q/k norms."""
    report = _counted_report(name)
    f = report.formula
    assert f["params_source"] == "architecture" and report.count_mismatch() is None, report.format()
    assert f["dense_params"] > 0 and (f["expert_params"] > 0) == name.startswith("moe"), f


def test_an_mlp_left_whole_under_tp_fails_the_count(monkeypatch, capsys):
    """The audit's mutation: the dense MLP declares no projections, so TP leaves it whole on every rank."""
    from loom.model.layers import SwiGLU
    from loom.model.surface import Surface
    from loom.tools import memory

    monkeypatch.setattr(SwiGLU, "surface", lambda self: Surface())
    report = _counted_report("tp2_sp")
    assert "dense" in (report.count_mismatch() or "") and report.params_bytes > report.formula["params_bytes"]
    assert memory.main(["--config", os.path.join(ROOT, "launch/configs/tiny_dense.yaml"), "--world", "2",
                        "--rank", "0", "parallel.tp=2"]) == 1
    assert "by the architecture" in capsys.readouterr().err


def _real_report(overrides):
    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, "launch/configs/tiny_moe.yaml"), overrides)
    groups = build_groups(cfg)
    report = Trainer(cfg, groups).memory.to_dict()
    groups.destroy()
    return report


@pytest.mark.slow
def test_dry_run_matches_a_real_rank(world4):
    """The dry run of rank 3 of TP2 x EP2 (+ the distributed optimizer) holds exactly what that rank allocates."""
    layout = ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "train.run_dir=runs/test_memory_report"]
    real = world4.run(_real_report, layout)[3]
    dry, _ = _dry_run("--config", "launch/configs/tiny_moe.yaml", "--world", "4", "--rank", "3", *layout)
    for key in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"):
        assert dry[key] == real[key], key
