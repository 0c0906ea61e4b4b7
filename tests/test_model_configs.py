"""The published-model configs: each valid at its own layout, each with a tiny twin of the same structure."""
import os
import re

import pytest

from tests.parity import ROOT

MODELS = ["llama3_8b", "llama3_70b", "mixtral_8x7b", "qwen3_30b_a3b", "qwen3_235b_a22b", "deepseek_v3",
          "llava_1_5_7b"]
BIG = os.path.join(ROOT, "launch/configs/models/{}.yaml")
TINY = os.path.join(ROOT, "launch/configs/models/tiny/{}.yaml")


def world_size(name: str) -> int:
    """The world size a config's header states (``World size N.``)."""
    with open(BIG.format(name)) as f:
        found = re.search(r"World size (\d+)\.", f.read())
    assert found, f"{name}.yaml does not state its world size"
    return int(found.group(1))


def structure(cfg) -> dict:
    """What makes two configs the same kind of model, whatever their sizes."""
    m, moe, v = cfg.model, cfg.model.moe, cfg.model.vision
    out = {"gqa": m.num_kv_heads < m.num_heads, "explicit_head_dim": m.head_dim is not None,
           "qk_norm": m.qk_norm, "attention_bias": m.attention_bias, "tie_embeddings": m.tie_embeddings,
           "moe": moe.num_experts > 0, "vision": v.enabled}
    if moe.num_experts:
        out.update(router=moe.router, norm_topk_prob=moe.norm_topk_prob, top_k_above_1=moe.top_k > 1,
                   shared_experts=moe.num_shared_experts > 0, shared_gate=moe.shared_expert_gate,
                   group_limited=moe.n_group > 1, routed_scaling=moe.routed_scaling_factor != 1.0,
                   bias_update=moe.bias_update_rate > 0, aux_loss=moe.aux_loss_coeff > 0,
                   aux_loss_type=moe.aux_loss_type, dense_first=moe.first_k_dense > 0,
                   layer_freq=moe.layer_freq)
    if v.enabled:
        out.update({f"vision.{k}": getattr(v, k) for k in ("norm", "mlp", "merge", "class_token", "pre_norm",
                                                             "post_norm", "patch_bias", "o_bias", "feature_layer",
                                                             "feature_select")})
    return out


@pytest.mark.parametrize("name", MODELS)
def test_config_is_valid_at_its_layout(name):
    from loom.config import load_config

    cfg = load_config(BIG.format(name))
    world = world_size(name)
    p = cfg.parallel
    assert p.dp is None, "dp is derived from the world size: a config that pins it breaks a tp/pp override"
    assert p.tp * p.pp * p.cp * cfg.dp_size(world) == world
    cfg.validate(world)
    assert cfg.train.dtype == "bf16" and (p.tp == 1 or p.sp)


def test_a_layout_override_alone_refits_the_world():
    """tp and pp given on the command line: dp follows from the world size, whatever the file's layout."""
    from loom.config import load_config

    cfg = load_config(BIG.format("llama3_8b"), ["parallel.tp=8", "parallel.pp=8", "parallel.cp=1"])
    cfg.validate(64)
    assert cfg.dp_size(64) == 1 and cfg.dp_size(128) == 2


@pytest.mark.parametrize("name", MODELS)
def test_tiny_twin_has_the_same_structure(name):
    from loom.config import load_config

    big, tiny = load_config(BIG.format(name)), load_config(TINY.format(name))
    tiny.validate(1)
    assert structure(tiny) == structure(big)


def test_structure_tells_models_apart():
    """The comparison above can fail: a twin that lost its q/k-norm, or its shared expert, differs."""
    from loom.config import load_config

    big = load_config(BIG.format("qwen3_30b_a3b"))
    tiny = load_config(TINY.format("qwen3_30b_a3b"), ["model.qk_norm=false"])
    assert structure(tiny) != structure(big)
    big = load_config(BIG.format("deepseek_v3"))
    assert structure(load_config(TINY.format("deepseek_v3"), ["model.moe.num_shared_experts=0"])) != structure(big)


def _train_two_steps(name):
    from loom.config import load_config
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(TINY.format(name), [f"train.run_dir=runs/test_configs/{name}"])
    groups = build_groups(cfg)
    losses = [r["loss"] for r in Trainer(cfg, groups).fit()]
    groups.destroy()
    return losses


@pytest.mark.parametrize("name", [n for n in MODELS if n != "llava_1_5_7b"])
def test_tiny_twin_trains(world2, name):
    losses = world2.run(_train_two_steps, name, nranks=1)[0]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses), losses


def test_tiny_llava_runs_a_forward():
    import torch

    from loom.config import load_config
    from loom.model.vlm import build_vlm

    cfg = load_config(TINY.format("llava_1_5_7b"))
    torch.manual_seed(0)
    model = build_vlm(cfg.model)
    tokens = model.tokens_per_image
    assert tokens == (32 // 8) ** 2  # the class token is dropped from the features (feature_select default)
    ids = torch.randint(0, 200, (1, 8 + tokens))
    ids[0, 4:4 + tokens] = cfg.model.image_token_id
    logits = model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 8 + tokens, 256) and torch.isfinite(logits).all()
