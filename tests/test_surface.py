"""The declared model surface: a block type Loom has never seen is parallelized, adapted and split by its
declaration alone, and trains under TP (with SP) and PP, with LoRA, exactly as at world size 1 (fp32)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.model import surface
from loom.model.layers import RMSNorm
from loom.model.surface import COLUMN, ROW, Surface
from tests.parity import ROOT, assert_parity, train_layout

CONFIG = "launch/configs/tiny_dense.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_surface", "model.attn_backend=torch", "checkpoint.resume=none",
        "model.num_layers=3"]
LORA = ["finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.target_modules=[q_proj,up_proj,down_proj]"]
GROUP = 8


class GroupNormGLU(nn.Module):
    """``w_out(gelu(group_norm(w_a x)) * w_b x)``: biased column projections, a norm shared by every group of
    ``GROUP`` features (TP ranks hold different groups), a biased row projection and a cache slot."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.w_a = nn.Linear(hidden, inner, bias=True)
        self.w_b = nn.Linear(hidden, inner, bias=False)
        self.group_norm = RMSNorm(GROUP)
        self.w_out = nn.Linear(inner, hidden, bias=True)

    def surface(self) -> Surface:
        return Surface(projections={"w_a": COLUMN, "w_b": COLUMN, "w_out": ROW},
                       adapters={"w_a": "up_proj", "w_out": "down_proj"}, head_norms=("group_norm",),
                       cache=("state",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.group_norm(self.w_a(x).unflatten(-1, (-1, GROUP))).flatten(-2)
        return self.w_out(F.gelu(a) * self.w_b(x))


def _toy_mlp(cfg, i, wiring=None):
    return GroupNormGLU(cfg.hidden_size, cfg.intermediate_size)


def train_toy(overrides: list[str]) -> dict | None:
    """``train_layout`` with every decoder MLP a GroupNormGLU (on each rank of the world)."""
    from loom.model import decoder

    original, decoder.build_mlp = decoder.build_mlp, _toy_mlp
    try:
        return train_layout(CONFIG, BASE + overrides)
    finally:
        decoder.build_mlp = original


LAYOUTS = {
    "tp2_sp_lora": (LORA, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2_lora": (LORA, ["parallel.pp=2", "parallel.pp_layout=[2,1]"]),
    "tp2_sp": ([], ["parallel.tp=2", "parallel.sp=true"]),  # the whole block trains: norms, biases
}


@pytest.fixture(scope="module")
def references(world2):
    return {"lora": world2.run(train_toy, LORA, nranks=1)[0], "full": world2.run(train_toy, [], nranks=1)[0]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_declared_block_trains_under_every_layout(world2, references, layout):
    lora, overrides = LAYOUTS[layout]
    ref = references["lora" if lora else "full"]
    out = world2.run(train_toy, lora + overrides, nranks=2)[0]
    # Trained whole, the block's norm over 8 features amplifies rounding step by step: the first step's
    # gradients agree to 5e-7, the last (after 4 Adam steps) to 2e-5; a missed reduction is off by ~50%.
    worst = assert_parity(ref, out, rtol=1e-5 if lora else 5e-5)
    print(layout, {k: f"{v:.1e}" for k, v in worst.items()})
    trained = set(out["last_grads"])
    assert any(".mlp.w_a." in k for k in trained) and any(".mlp.w_out." in k for k in trained), sorted(trained)
    if lora:  # the toy's declared targets, and only adapters
        assert all("lora_" in k for k in trained) and not any(".mlp.w_b." in k for k in trained), sorted(trained)
    else:
        assert any(".mlp.group_norm." in k for k in trained), sorted(trained)


def test_the_declaration_is_what_the_passes_read():
    from loom.config import LoRAConfig, load_config
    from loom.model import decoder
    from loom.model.lora import apply_lora

    cfg = load_config(f"{ROOT}/{CONFIG}", BASE).model
    original, decoder.build_mlp = decoder.build_mlp, _toy_mlp
    try:
        model = decoder.build_model(cfg)
    finally:
        decoder.build_mlp = original
    assert list(surface.blocks(model)) == [0, 1, 2] and surface.language_model(model) is model
    block = surface.blocks(model)[1]
    caches = [s.cache for _, s in surface.declared(block) if s.cache]
    assert caches == [("kv",), ("state",)], caches
    sites = [(type(owner).__name__, name) for owner, name, _ in surface.adapter_sites(model, ["up_proj"])]
    assert sites == [("GroupNormGLU", "w_a")] * 3, sites
    assert apply_lora(model, LoRAConfig(rank=2, alpha=4, target_modules=["down_proj"])) == 3
    with pytest.raises(ValueError, match="role 'diagonal'"):
        Surface(projections={"w": "diagonal"})
