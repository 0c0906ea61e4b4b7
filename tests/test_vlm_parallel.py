"""Parity of the vision-language model: parallel layouts against world size 1, 5 fp32 steps.

The data is the synthetic VQA set (tools/make_synthetic_vqa.py) with a tokenizer trained on it,
made once per module; every layout trains on the same global batches.
"""
from __future__ import annotations

import pytest

from loom.config import load_config
from tests.parity import ROOT, assert_parity, params, train_layout, world1_references

CONFIG = "launch/configs/demo_vlm_moe.yaml"
SINGLE = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "parallel.cp=1", "model.attn_backend=torch",
          "train.dtype=fp32", "train.global_batch_size=8", "train.micro_batch_size=1"]
DENSE = ["model.moe.num_experts=0"]

FREEZE = ["finetune.freeze=[vision]"]
# One layout per parallel dimension, each with and without a frozen vision tower, on the demo's MoE LLM;
# then combinations, interleaved stages, and a dense LLM without patch merging.
BASE_LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "cp2": (2, ["parallel.cp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2_sp_pp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2"]),
}
LAYOUTS = {
    **BASE_LAYOUTS,
    **{f"{name}_freeze_vision": (n, o + FREEZE) for name, (n, o) in BASE_LAYOUTS.items()},
    "tp2_sp_ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"]),
    "pp2_vpp2_interleaved": (2, ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved",
                                 "model.num_layers=4"]),
    "tp2_sp_dense_nomerge": (2, DENSE + ["parallel.tp=2", "parallel.sp=true", "model.vision.merge=false"]),
    "pp2_zb1": (2, ["parallel.pp=2", "parallel.pp_schedule=zb1"]),
}
MODEL_KEYS = ("model.", "finetune.freeze")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from loom.tools.make_synthetic_vqa import make_synthetic_vqa
    from loom.tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=64, n_eval=4, image_size=32, seed=0)
    tok = train_tokenizer([str(paths["train"])], str(root / "tok"), vocab_size=200)
    return [f"data.train_jsonl={paths['train']}", f"data.eval_jsonl={paths['eval']}", f"data.tokenizer={tok}",
            f"train.run_dir={root / 'run'}", "checkpoint.resume=none"]


@pytest.fixture(scope="module")
def references(world4, data):
    return world1_references(world4, CONFIG, data + SINGLE, MODEL_KEYS)


@pytest.mark.parametrize("layout", params(LAYOUTS, slow=("tp2_sp_pp2", "cp2_tp2_sp", "tp2_sp_dense_nomerge",
                                                         "pp2_zb1")))
def test_vlm_parity(world4, references, data, layout):
    nranks, overrides = LAYOUTS[layout]
    ref = references(overrides)
    out = world4.run(train_layout, CONFIG, data + SINGLE + overrides, nranks=nranks)[0]
    assert_parity(ref, out)
    frozen = "finetune.freeze=[vision]" in overrides
    assert any(k.startswith("vision.") for k in out["first_grads"]) != frozen
    assert any(k.startswith("projector.") for k in out["first_grads"])


def test_demo_config_uses_two_parallel_dimensions_besides_dp(data):
    cfg = load_config(f"{ROOT}/{CONFIG}", data)
    cfg.validate(4)
    p = cfg.parallel
    assert (p.tp, p.sp, p.ep, cfg.dp_size(4)) == (2, True, 2, 2)
    assert cfg.model.moe.num_experts > 0 and cfg.model.vision.enabled and cfg.model.vision.tokens_per_image == 4
