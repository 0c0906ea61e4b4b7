"""LoRA: config errors, a frozen base with only adapters in the optimizer, and parity of the adapters'
training under TP + SP, EP (experts adapted), PP, CP and TP x EP against world size 1 (fp32)."""
import pytest

from tests.parity import assert_parity, params, train_layout

CONFIG = "launch/configs/tiny_moe.yaml"
TARGETS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,shared_expert,experts]"
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", f"finetune.lora.target_modules={TARGETS}"]
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_lora", "model.attn_backend=torch", "checkpoint.resume=none",
        *LORA]
LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "ep2": (2, ["parallel.ep=2"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_layout=[2,1]"]),
    # Weight-gradient passes deferred (W) must leave the frozen base alone: it has no gradient to split.
    "pp2_zb1": (2, ["parallel.pp=2", "parallel.pp_layout=[2,1]", "parallel.pp_schedule=zb1"]),
    "cp2": (2, ["parallel.cp=2"]),
    "tp2_sp_ep2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]),
}


@pytest.fixture(scope="module")
def reference(world4):
    return world4.run(train_layout, CONFIG, BASE, nranks=1)[0]


@pytest.mark.parametrize("layout", params(list(LAYOUTS), slow=list(LAYOUTS)))
def test_lora_parity(world4, reference, layout):
    nranks, overrides = LAYOUTS[layout]
    out = world4.run(train_layout, CONFIG, BASE + overrides, nranks=nranks)[0]
    worst = assert_parity(reference, out)
    print(layout, {k: f"{v:.1e}" for k, v in worst.items()})
    trained = {k for k in out["last_grads"]}
    assert trained and all("lora_" in k for k in trained), sorted(trained)[:4]
    assert any(k.startswith("layers.1.mlp.experts.") for k in trained)


def _train_and_save(overrides: list[str], steps: int, save: str | None) -> dict | None:
    """``steps`` steps of a 5-step run (the LR schedule of 5), then a checkpoint at ``save``; rank 0 returns
    the losses and what the optimizer holds."""
    import torch.distributed as dist

    from loom.config import load_config
    from loom.train.checkpoint import save as save_checkpoint
    from loom.train.trainer import Trainer, build_groups
    from tests.parity import ROOT

    cfg = load_config(f"{ROOT}/{CONFIG}", ["train.steps=5", *BASE[:-len(LORA)], *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    losses = [trainer.train_step()["loss"] for _ in range(steps - trainer.step)]
    if save:
        save_checkpoint(save, trainer.model, trainer.optimizer, trainer.step, cfg)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    out = {"losses": losses, "trainable": trainable, "optimizer_bytes": trainer.optimizer.state_bytes(),
           "adapter_numel": sum(p.numel() for p in trainer.params if p.requires_grad),
           "numel": sum(p.numel() for p in trainer.model.parameters())}
    groups.destroy()
    return out if dist.get_rank() == 0 else None


@pytest.mark.slow
def test_only_adapters_reach_the_optimizer(world4):
    lora = world4.run(_train_and_save, LORA, 1, None, nranks=1)[0]
    full = world4.run(_train_and_save, [], 1, None, nranks=1)[0]
    assert all("lora_A" in n or "lora_B" in n for n in lora["trainable"]) and len(lora["trainable"]) > 0
    # fp32 AdamW: two moments per trainable element, nothing for the frozen base
    assert lora["optimizer_bytes"] == 8 * lora["adapter_numel"]
    assert full["optimizer_bytes"] == 8 * full["numel"]
    assert lora["optimizer_bytes"] < full["optimizer_bytes"] / 4


@pytest.mark.slow
def test_lora_resumes_under_another_layout(world4, tmp_path):
    """Adapters and their Adam state are saved at global shapes: TP2 x EP2 saves, world size 1 resumes."""
    ckpt = str(tmp_path / "ckpt")
    whole = world4.run(_train_and_save, LORA, 3, None, nranks=1)[0]["losses"]
    world4.run(_train_and_save, LORA + LAYOUTS["tp2_sp_ep2"][1], 2, ckpt, nranks=4)
    resumed = world4.run(_train_and_save, LORA + [f"checkpoint.resume={ckpt}"], 3, None, nranks=1)[0]["losses"]
    assert len(resumed) == 1 and abs(resumed[0] - whole[2]) <= 1e-5 * abs(whole[2])


@pytest.mark.parametrize("override, key", [
    ("finetune.lora.rank=-1", "finetune.lora.rank"),
    ("finetune.lora.target_modules=[q_proj,qkv]", "finetune.lora.target_modules"),
    ("finetune.lora.dropout=1.0", "finetune.lora.dropout"),
])
def test_lora_config_errors_name_the_field(override, key):
    from loom.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(CONFIG, [override]).validate(1)


def test_lora_target_missing_from_the_model():
    from loom.config import ConfigError, load_config

    cfg = load_config("launch/configs/tiny_dense.yaml", ["finetune.lora.rank=4", "finetune.lora.target_modules=[experts]"])
    with pytest.raises(ConfigError, match="'experts' names no layer"):
        cfg.validate(1)
