"""LoRA <-> PEFT: a Loom-trained adapter exported as a PEFT directory loads with ``peft`` onto the HF model
with Loom's logits (1e-4); merged export loads in transformers alone; a PEFT adapter imported into Loom
gives PEFT's logits. Dense: Llama. MoE: Qwen2-MoE, adapting attention and the shared expert (transformers
fuses routed experts into parameters, which PEFT's module LoRA cannot target)."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from tests.test_convert import ATOL, BASE, logits, make_hf, max_diff, read_safetensors  # noqa: E402

import loom  # noqa: E402
from loom.tools.convert_hf import main as convert_cli  # noqa: E402

TARGETS = {"LlamaForCausalLM": "[q_proj,v_proj,o_proj,gate_proj,down_proj]",
           "Qwen2MoeForCausalLM": "[q_proj,k_proj,v_proj,o_proj,shared_expert]"}


def _train_lora(loom_dir: str, run_dir: str, targets: str) -> str:
    """Two ranks: the imported base, LoRA at TP2 (SP for MoE), 3 steps, saved."""
    import os

    from loom.checkpoint import storage as io
    from loom.config import load_config
    from loom.model.hf.convert import checkpoint_model_config
    from loom.train.trainer import Trainer, build_groups

    model_cfg = checkpoint_model_config(io.read_marker(loom_dir), loom_dir)
    sp = ["parallel.sp=true"] if model_cfg.moe.num_experts else []
    cfg = load_config(None, ["parallel.tp=2", *sp, "train.steps=3", "checkpoint.save_interval=3",
                             "train.global_batch_size=2", "data.seq_len=16", "data.num_tokens=4096",
                             "optim.warmup_steps=0", "optim.lr=3e-2",
                             f"checkpoint.resume={loom_dir}", f"train.run_dir={run_dir}", "train.log_interval=100",
                             "finetune.lora.rank=4", "finetune.lora.alpha=8", f"finetune.lora.target_modules={targets}"])
    cfg.model = model_cfg
    cfg.model.attn_backend = "torch"
    groups = build_groups(cfg)
    Trainer(cfg, groups).fit()
    groups.destroy()
    return os.path.join(run_dir, "checkpoints", "step_00000003")


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_loom_adapter_loads_in_peft_and_merges(world2, arch, tmp_path):
    hf = make_hf(arch, tmp_path / "hf")
    assert convert_cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "loom")]) == 0
    ckpt = world2.run(_train_lora, str(tmp_path / "loom"), str(tmp_path / "run"), TARGETS[arch])[0]
    ours = loom.from_pretrained(ckpt, attn_backend="torch")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    ref = logits(ours, ids)
    assert max_diff(ref, logits(hf, ids)) > 100 * ATOL, "the adapters changed nothing"

    assert convert_cli(["export", "--ckpt", ckpt, "--out", str(tmp_path / "peft"), "--adapter-only"]) == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]
    tensors = read_safetensors(tmp_path / "peft")
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in tensors)
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    err = max_diff(logits(adapted, ids), ref)
    print(f"{arch}: PEFT logits vs Loom max |diff| {err:.2e}")
    assert err <= ATOL

    assert convert_cli(["export", "--ckpt", ckpt, "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    err = max_diff(logits(merged, ids), ref)
    print(f"{arch}: merged HF logits vs Loom max |diff| {err:.2e}")
    assert err <= ATOL
    assert convert_cli(["export", "--ckpt", ckpt, "--out", str(tmp_path / "plain")]) == 2  # adapters: say how


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_peft_adapter_imports_into_loom(arch, tmp_path):
    hf = make_hf(arch, tmp_path / "hf")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"]
                                                          if arch == "LlamaForCausalLM" else [])
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(1)
    adapted = peft.get_peft_model(hf, config).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    assert convert_cli(["import", "--hf", str(tmp_path / "hf"), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "loom")]) == 0
    ours = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    with adapted.disable_adapter():
        assert max_diff(logits(adapted, ids), logits(ours, ids)) > 100 * ATOL, "the adapter changes nothing"
    err = max_diff(logits(ours, ids), logits(adapted, ids))
    print(f"{arch}: imported PEFT adapter, Loom vs PEFT logits max |diff| {err:.2e}")
    assert err <= ATOL
    # and back: the same adapter, bit for bit, under PEFT's names
    assert convert_cli(["export", "--ckpt", str(tmp_path / "loom"), "--out", str(tmp_path / "back"),
                        "--adapter-only"]) == 0
    before, after = read_safetensors(tmp_path / "adapter"), read_safetensors(tmp_path / "back")
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["r"] == 4
    with adapted.disable_adapter():
        base = logits(adapted, ids)
    reloaded = peft.PeftModel.from_pretrained(make_hf(arch, tmp_path / "hf2"), tmp_path / "back").eval()
    assert max_diff(logits(reloaded, ids), logits(ours, ids)) <= ATOL < max_diff(base, logits(ours, ids))


def test_adapter_with_dora_is_refused(tmp_path):
    make_hf("LlamaForCausalLM", tmp_path / "hf")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                          "use_dora": True}))
    assert convert_cli(["import", "--hf", str(tmp_path / "hf"), "--adapter", str(tmp_path / "adapter"),
                        "--out", str(tmp_path / "loom")]) == 2


def _fine_tune(overrides: list[str]) -> list[float]:
    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(None, ["train.steps=2", "train.global_batch_size=2", "data.seq_len=16", "data.num_tokens=4096",
                             "model.attn_backend=torch", "train.log_interval=100", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    out = [trainer.train_step()["loss"] for _ in range(2)]
    groups.destroy()
    return out


@pytest.mark.slow
def test_model_pretrained_from_an_hf_directory(world2, tmp_path):
    """model.pretrained=HF_DIR: no model section, the HF weights (converted on the fly) are the start; a Loom
    checkpoint of them gives the same losses; a conflicting model key is an error naming it."""
    from loom.config import ConfigError, load_config
    from loom.train.init_from import resolve_pretrained

    make_hf("LlamaForCausalLM", tmp_path / "hf")
    lora = ["finetune.lora.rank=4", "checkpoint.resume=none"]
    from_hf = world2.run(_fine_tune, [f"model.pretrained={tmp_path / 'hf'}", f"train.run_dir={tmp_path / 'a'}",
                                      *lora], nranks=1)[0]
    assert convert_cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "loom")]) == 0
    from_loom = world2.run(_fine_tune, [f"model.pretrained={tmp_path / 'loom'}", f"train.run_dir={tmp_path / 'b'}",
                                        *lora, "parallel.tp=2"], nranks=2)[0]
    scratch = world2.run(_fine_tune, [f"train.run_dir={tmp_path / 'c'}", *lora, "model.vocab_size=128",
                                      "model.hidden_size=32", "model.intermediate_size=64"], nranks=1)[0]
    assert abs(from_hf[0] - from_loom[0]) <= 1e-5 * from_hf[0] and abs(from_hf[0] - scratch[0]) > 1e-3
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'hf'}", "model.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 conflicts with model\.pretrained"):
        resolve_pretrained(cfg)
