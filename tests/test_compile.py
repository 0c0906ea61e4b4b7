"""``train.compile``: compiled blocks train as eager ones do, under each layout, without a recompile per batch.

Each run starts from a clean dynamo state in its rank process (the harness reuses processes), and
the compiled run reports what dynamo compiled, so a run that silently fell back to eager fails.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.parity import BF16, ROOT, RTOL, UPDATE_RTOL, assert_close_tensors, assert_parity, params, train_layout

DENSE, MOE = "launch/configs/tiny_dense.yaml", "launch/configs/tiny_moe.yaml"
# Windows of 32 tokens: some hold one document, whose attention is compiled into the graph, the
# others several, whose attention runs eagerly between two graphs; both occur in every step.
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_compile", "model.attn_backend=torch", "data.seq_len=32"]
MOE_LOSSES = ["model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001", "model.moe.aux_loss_type=seq"]
STEPS = 2
COMPILE = ["train.compile=true"]
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "checkpoint.resume=none"]
LORA_DENSE = "finetune.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def _fresh_dynamo(backend) -> None:
    import torch
    import torch._dynamo.utils

    import loom.model.compile

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loom.model.compile.BACKEND = backend


def _train(config: str, overrides: list[str], backend="inductor") -> dict | None:
    """``train_layout`` for STEPS steps from a clean dynamo state; rank 0 adds the graphs dynamo compiled."""
    import torch._dynamo.utils

    _fresh_dynamo(backend)
    out = train_layout(config, overrides, steps=STEPS)
    if out is not None:
        out["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return out


def _perturbed(gm, example_inputs):
    """A compiler that gets the graph slightly wrong: every floating output 1e-4 too large."""
    import torch

    def run(*args):
        outs = gm(*args)
        return type(outs)(o * (1 + 1e-4) if torch.is_tensor(o) and o.is_floating_point() else o for o in outs)
    return run


@pytest.fixture(scope="module")
def eager_dense(world2):
    return world2.run(_train, DENSE, BASE, nranks=1)[0]


def test_compiled_blocks_match_eager(world2, eager_dense):
    out = world2.run(_train, DENSE, BASE + COMPILE, nranks=1)[0]
    assert out["graphs"] > 0, "nothing was compiled"
    worst = assert_parity(eager_dense, out)
    print("compiled vs eager, worst relative errors:", worst)


def test_parity_catches_a_wrong_graph(world2, eager_dense):
    out = world2.run(_train, DENSE, BASE + COMPILE, backend=_perturbed, nranks=1)[0]
    assert out["graphs"] > 0
    with pytest.raises(AssertionError) as caught:
        assert_parity(eager_dense, out)
    print("a graph 1e-4 off fails parity:", str(caught.value).splitlines()[0])


def _compiled_frames_per_step(steps: int) -> list[int]:
    """Frames dynamo has compiled after each step (the backend is dynamo's eager one: only guards count)."""
    import torch._dynamo.utils

    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups

    _fresh_dynamo("eager")
    cfg = load_config(os.path.join(ROOT, DENSE), [*BASE, *COMPILE, f"train.steps={steps}"])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    frames = []
    for _ in range(steps):
        trainer.train_step()
        frames.append(torch._dynamo.utils.counters["frames"]["total"])
    groups.destroy()
    return frames


def test_new_packings_do_not_recompile(world2):
    """Every microbatch packs other documents (their number, lengths and max_seqlen change). The first
    step meets both attention variants; the first batch of equal-length documents whose count differs
    from the first such batch's retraces that graph once, with symbolic sizes (dynamo's automatic
    dynamic shapes, here in step 3); every batch after that reuses a graph."""
    frames = world2.run(_compiled_frames_per_step, 8, nranks=1)[0]
    print("compiled frames after each step:", frames)
    assert frames[-1] <= frames[0] + 1 and frames[3] == frames[-1], frames


# Compiled against eager under the same layout: each layout's own collectives, stages and shards.
LAYOUTS = {
    "tp2_sp": (DENSE, 2, ["parallel.tp=2", "parallel.sp=true"]),
    "ep2_moe": (MOE, 2, MOE_LOSSES + ["parallel.ep=2"]),
    "pp2": (DENSE, 2, ["parallel.pp=2"]),
    "cp2_ring": (DENSE, 2, ["parallel.cp=2"]),
    "full_recompute": (DENSE, 1, ["train.recompute=full"]),
    # The checkpointed attention core stays eager inside a compiled block (engine/model/recompute.py).
    "selective_recompute": (DENSE, 1, ["train.recompute=selective"]),
    "moe_full_recompute": (MOE, 1, MOE_LOSSES + ["train.recompute=full"]),
    # Adapted linears in the graph (a frozen base; the routed experts' adapters run eagerly with their
    # MoE layer), and the adapters' TP shards.
    "lora": (MOE, 1, MOE_LOSSES + LORA + [LORA_DENSE[:-1] + ",shared_expert,experts]"]),
    "lora_tp2_sp": (DENSE, 2, LORA + [LORA_DENSE, "parallel.tp=2", "parallel.sp=true"]),
}


@pytest.mark.parametrize("layout", params(LAYOUTS, slow=list(LAYOUTS)))
def test_compiled_layout_matches_eager(world2, layout):
    config, nranks, overrides = LAYOUTS[layout]
    ref = world2.run(_train, config, BASE + overrides, nranks=nranks)[0]
    out = world2.run(_train, config, BASE + overrides + COMPILE, nranks=nranks)[0]
    assert out["graphs"] > 0, "nothing was compiled"
    if not layout.startswith("lora"):
        print(layout, "compiled vs eager, worst relative errors:", assert_parity(ref, out))
        return
    # B starts at zero, so after one step an adapter is nothing but Adam's first update, which holds
    # rounding only to UPDATE_RTOL (tests/parity.py): so do the last step's gradients, which scale with B.
    assert_close_tensors("first_grads", ref["first_grads"], out["first_grads"], RTOL)
    print(layout, "compiled vs eager, worst relative errors:", assert_parity(ref, out, rtol=UPDATE_RTOL))
    assert all("lora_" in k for k in out["last_grads"]), "a frozen base weight got a gradient"


# Inductor keeps some bf16 intermediates in fp32, eager rounds them: Adam's sign-like first steps turn
# that into updates 11% apart (measured) while the gradients stay within bf16's 1%.
COMPILED_BF16 = {**BF16, "update_rtol": 0.15}


@pytest.mark.slow
def test_compiled_bf16_matches_eager_bf16(world2):
    """Under autocast too (inductor keeps some bf16 intermediates in fp32: bf16 tolerances)."""
    overrides = BASE + ["train.dtype=bf16"]
    ref = world2.run(_train, DENSE, overrides, nranks=1)[0]
    out = world2.run(_train, DENSE, overrides + COMPILE, nranks=1)[0]
    assert out["graphs"] > 0, "nothing was compiled"
    print("bf16 compiled vs eager, worst relative errors:", assert_parity(ref, out, **COMPILED_BF16))


VLM = "launch/configs/demo_vlm_moe.yaml"
VLM_SINGLE = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "model.attn_backend=torch", "train.dtype=fp32",
              "train.global_batch_size=8", "train.micro_batch_size=1"]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from loom.tools.make_synthetic_vqa import make_synthetic_vqa
    from loom.tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=64, n_eval=4, image_size=32, seed=0)
    tok = train_tokenizer([str(paths["train"])], str(root / "tok"), vocab_size=200)
    return [f"data.train_jsonl={paths['train']}", f"data.eval_jsonl={paths['eval']}", f"data.tokenizer={tok}",
            f"train.run_dir={root / 'run'}", "checkpoint.resume=none"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["world1", "tp2_sp"])
def test_compiled_vision_language_model_matches_eager(world2, vqa, layout):
    """The vision tower's blocks too (their images are equal-length documents: attention in the graph),
    and multimodal packing, whose token count changes between microbatches."""
    nranks, overrides = (1, []) if layout == "world1" else (2, ["parallel.tp=2", "parallel.sp=true"])
    ref = world2.run(_train, VLM, vqa + VLM_SINGLE + overrides, nranks=nranks)[0]
    out = world2.run(_train, VLM, vqa + VLM_SINGLE + overrides + COMPILE, nranks=nranks)[0]
    assert out["graphs"] > 0, "nothing was compiled"
    assert any(k.startswith("vision.") for k in out["first_grads"])
    print(layout, "compiled vs eager, worst relative errors:", assert_parity(ref, out))


def test_step_benchmark_runs(tmp_path):
    """tools/bench_step.py end to end on a tiny model (its compiled variant is what the tests above check)."""
    out = tmp_path / "bench.json"
    variants = ["hf", "loom plain", "loom fused", "kernel floor"]
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_step.py"), "--layers", "1", "--hidden", "64",
           "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--batch", "2", "--seq", "32",
           "--iters", "2", "--warmup", "1", "--threads", "1", "--json", str(out), "--variants", *variants]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| loom fused |" in result.stdout and "| kernel floor |" in result.stdout
    record = json.loads(out.read_text())
    assert list(record["variants"]) == variants
    assert all(len(row["times_s"]) == 2 and "ratio" in row for name, row in record["variants"].items() if name != "hf")
