"""Config loading and validation: errors name the key and come before any process group."""
import os

import pytest

from loom.config import Config, ConfigError, load_config

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch", "configs", "tiny_dense.yaml")


def test_tiny_dense_loads_and_validates():
    cfg = load_config(TINY)
    cfg.validate(world_size=1)
    assert cfg.model.hidden_size == 64 and cfg.train.dtype == "fp32"


def test_overrides_are_typed():
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.sp=true", "optim.lr=1e-3", "model.head_dim=null"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.model.head_dim is None


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3", "model.num_heads=9", "model.num_kv_heads=9", "model.hidden_size=72"], 3,
     r"parallel.tp=3 does not divide model.intermediate_size=128"),
    (["parallel.tp=2", "parallel.dp=2"], 6, r"world size 6 != tp\*pp\*cp\*dp"),
    (["model.num_kv_heads=3"], 1, r"model.num_kv_heads=3 does not divide model.num_heads=4"),
    (["train.global_batch_size=6"], 4, r"train.global_batch_size=6 is not divisible by dp\*train.micro_batch_size"),
    (["parallel.sp=true"], 1, r"parallel.sp=true needs parallel.tp > 1"),
    (["train.dtype=fp16"], 1, r"train.dtype='fp16' must be fp32 or bf16"),
    (["model.attn_backend=cuda"], 1, r"model.attn_backend='cuda' is not one of"),
    (["parallel.pp=2", "parallel.pp_schedule=zb1", "train.compile=true"], 2,
     r"parallel.pp_schedule=zb1 with train.compile=true"),
])
def test_bad_layouts_name_the_key(overrides, world, message):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world)


@pytest.mark.parametrize("overrides, message", [
    (["model.num_head=4"], r"unknown key model.num_head"),
    (["modle.hidden_size=4"], r"unknown key modle"),
    (["model.hidden_size=abc"], r"model.hidden_size='abc' must be int, got str"),
    (["parallel.sp=3"], r"parallel.sp=3 must be bool, got int"),
    (["model.num_layers=2.5"], r"model.num_layers=2.5 must be int, got float"),
    (["train.steps=true"], r"train.steps=True must be int, got bool"),
    (["model=3"], r"model must be a mapping"),
    (["nokey"], r"must look like section.key=value"),
])
def test_bad_keys_and_types_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


@pytest.mark.parametrize("old, new", [("train.resume=none", "checkpoint.resume=none"),
                                      ("train.save_interval=5", "checkpoint.save_interval=5"),
                                      ("train.device=cpu", "runtime.device=cpu"),
                                      ("train.preflight=false", "runtime.preflight=false"),
                                      ("train.freeze=[vision]", "finetune.freeze=[vision]"),
                                      ("train.lora.rank=4", "finetune.lora.rank=4")])
def test_a_key_that_left_the_train_section_names_its_new_place(old, new):
    moved_from, moved_to = ("train.lora", "finetune.lora") if ".lora." in old else (old.split("=")[0], new.split("=")[0])
    with pytest.raises(ConfigError, match=rf"^{moved_from} is now {moved_to}: the train section was split"):
        load_config(TINY, [old])
    load_config(TINY, [new])  # where it lives now


@pytest.mark.parametrize("overrides, world", [
    (["parallel.tp=3"], 3),
    (["parallel.tp=4"], 6),
    (["model.nope=1"], 1),
    (["train.steps=many"], 1),
])
def test_launcher_fails_before_building_groups(monkeypatch, capsys, overrides, world):
    """launch/train.py reports the key and exits 2 without initialising torch.distributed."""
    import torch.distributed as dist

    from loom.launch.train import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["--config", TINY, *overrides]) == 2
    assert not dist.is_initialized()
    err = capsys.readouterr().err
    assert "config error:" in err and overrides[0].split("=")[0] in err


def test_defaults_validate():
    cfg = Config()
    cfg.validate(1)  # raises ConfigError on a bad default
    assert cfg.dp_size(1) == 1
