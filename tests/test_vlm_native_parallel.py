"""Parity of the native-resolution VLM (Qwen2.5-VL / Qwen3-VL towers): parallel layouts against world size 1,
5 fp32 steps on a MoE LLM with M-RoPE.

Every microbatch packs images of different sizes, a 4-frame video and text into three documents, so
M-RoPE positions, window attention borders and feature rows all differ from token to token; the
batches are built here and handed to the trainer in place of its data (each rank takes its DP share).
"""
from __future__ import annotations

import pytest
import torch

from loom.data.sampler import Microbatch
from tests.parity import assert_parity, params, train_layout

CONFIG = "launch/configs/tiny_moe.yaml"
IMAGE, VIDEO = 250, 251
PATCH = 3 * 2 * 4 * 4  # channels x temporal patch x patch^2
SEQ = 64  # tokens per microbatch: a multiple of 2*cp*tp
MICROBATCHES = 4  # per step (the global batch)
# A 32-wide tower of 3 blocks (block 1 attends over the whole frame, the others in windows of 2x2 merged
# tokens), and a 3-layer MoE LLM whose rotary frequencies turn with time, row and column.
QWEN2_5 = ["model.vision.enabled=true", "model.vision.arch=qwen2_5_vl", "model.vision.patch_size=4",
           "model.vision.hidden_size=32", "model.vision.intermediate_size=48", "model.vision.num_layers=3",
           "model.vision.num_heads=2", "model.vision.window_size=16", "model.vision.fullatt_block_indexes=[1]",
           "model.vision.tokens_per_second=2", f"model.image_token_id={IMAGE}", f"model.video_token_id={VIDEO}",
           "model.mrope_section=[2,1,1]"]
# Qwen3-VL: learned positions resized per image, DeepStack features from blocks 0 and 2 join LLM layers 0 and 1.
QWEN3 = [o for o in QWEN2_5 if "arch=" not in o and "fullatt" not in o] + [
    "model.vision.arch=qwen3_vl", "model.vision.num_position_embeddings=16",
    "model.vision.deepstack_visual_indexes=[0,2]", "model.mrope_interleaved=true"]
SINGLE = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "parallel.cp=1", "parallel.pp=1",
          "model.attn_backend=torch", "train.dtype=fp32", f"train.global_batch_size={MICROBATCHES}",
          "train.micro_batch_size=1", "checkpoint.resume=none"]
LAYOUTS = {
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "cp2_ring": (2, ["parallel.cp=2", "parallel.cp_mode=ring"]),
    "cp2_ulysses": (2, ["parallel.cp=2", "parallel.cp_mode=ulysses"]),
    "pp2": (2, ["parallel.pp=2", "parallel.pp_layout=[2,1]"]),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2_sp_pp2": (4, ["parallel.tp=2", "parallel.sp=true", "parallel.pp=2", "parallel.pp_layout=[2,1]"]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"]),
}
QWEN3_LAYOUTS = ("tp2_sp", "cp2_ring", "pp2")  # DeepStack rows sharded under SP and CP, kept on the first stage


# Image grids (t, h, w patches) per microbatch: 2x2 patches merge into one token, so 4x6 -> 6 tokens, 8x8 -> 16.
GRIDS = [[(1, 4, 6), (1, 8, 8)], [(1, 8, 4), (1, 4, 4), (1, 4, 8)], [(1, 8, 8), (1, 4, 4)], [(1, 4, 4), (1, 6, 4)]]
VIDEO_GRID = (2, 4, 4)  # 4 frames = two temporal patches, at M-RoPE times 0 and 3


def native_microbatch(step: int, index: int) -> Microbatch:
    """Three documents: text and images of different sizes between text; a 4-frame video in text; text."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    text = lambda n: torch.randint(1, 240, (n,), generator=gen).tolist()  # noqa: E731
    grids = GRIDS[(step + index) % len(GRIDS)]
    doc0 = text(3)
    for t, h, w in grids:
        doc0 += [IMAGE] * (t * h * w // 4) + text(2)
    doc1 = text(2) + [VIDEO] * (VIDEO_GRID[0] * VIDEO_GRID[1] * VIDEO_GRID[2] // 4) + text(3)
    docs = [doc0, doc1, text(SEQ - len(doc0) - len(doc1))]
    assert len(docs[-1]) > 1, "the media leave too little room for the last document"
    ids = torch.tensor([t for d in docs for t in d])
    lens = torch.tensor([len(d) for d in docs])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).int()
    labels = torch.cat([ids[1:], ids[:1]]).clone()
    labels[cu[1:] - 1] = -100  # a document's last token has no next token
    labels[(labels == IMAGE) | (labels == VIDEO)] = -100
    positions = torch.cat([torch.arange(n) for n in lens.tolist()]).int()
    image_grid = torch.tensor(grids)
    return Microbatch(
        input_ids=ids, labels=labels, positions=positions, cu_seqlens=cu, max_seqlen=int(lens.max()),
        num_sequences=1, num_loss_tokens=int((labels != -100).sum()),
        pixel_values=torch.randn(int(image_grid.prod(-1).sum()), PATCH, generator=gen), image_grid_thw=image_grid,
        pixel_values_videos=torch.randn(VIDEO_GRID[0] * VIDEO_GRID[1] * VIDEO_GRID[2], PATCH, generator=gen),
        video_grid_thw=torch.tensor([VIDEO_GRID]), second_per_grid_ts=torch.tensor([1.5]))


def train_native(config: str, overrides: list[str]) -> dict | None:
    """``train_layout`` on the batches above: step s's microbatches, this rank taking its DP share."""
    from loom.train.trainer import Trainer

    def microbatches(self, step: int):
        dp = self.cfg.dp_size(self.groups.world_size)
        return [native_microbatch(step, i) for i in range(MICROBATCHES)][self.groups.dp_rank::dp]

    original = Trainer.microbatches
    Trainer.microbatches = microbatches
    try:
        return train_layout(config, overrides)
    finally:
        Trainer.microbatches = original


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return SINGLE + [f"train.run_dir={tmp_path_factory.mktemp('native_vlm') / 'run'}"]


@pytest.fixture(scope="module")
def references(world4, base):
    cache: dict[tuple, dict] = {}

    def get(model: list[str]) -> dict:
        if tuple(model) not in cache:
            cache[tuple(model)] = world4.run(train_native, CONFIG, base + model, nranks=1)[0]
        return cache[tuple(model)]

    return get


def _check(world4, references, base, model, layout):
    nranks, overrides = LAYOUTS[layout]
    ref = references(model)
    out = world4.run(train_native, CONFIG, base + model + overrides, nranks=nranks)[0]
    worst = assert_parity(ref, out)
    print(f"{layout}: worst relative errors {worst}")
    assert any(k.startswith("vision.") for k in out["first_grads"])
    assert any(k.startswith("projector.") for k in out["first_grads"])


@pytest.mark.parametrize("layout", params(LAYOUTS, slow=list(LAYOUTS)))
def test_qwen2_5_vl_parity(world4, references, base, layout):
    _check(world4, references, base, QWEN2_5, layout)


@pytest.mark.slow
@pytest.mark.parametrize("layout", QWEN3_LAYOUTS)
def test_qwen3_vl_deepstack_parity(world4, references, base, layout):
    _check(world4, references, base, QWEN3, layout)


def test_microbatch_mixes_image_sizes_and_a_video():
    mb = native_microbatch(0, 0)
    assert mb.input_ids.numel() == SEQ and len(set(map(tuple, mb.image_grid_thw.tolist()))) > 1
    assert int((mb.input_ids == VIDEO).sum()) == 8 and int(mb.cu_seqlens.numel()) == 4


def meta_vlm(overrides: list[str]):
    from loom.config import load_config
    from loom.model.vlm import build_vlm
    from tests.parity import ROOT

    cfg = load_config(f"{ROOT}/{CONFIG}", SINGLE + overrides)
    with torch.device("meta"):
        return cfg, build_vlm(cfg.model)


def test_cp_shards_mrope_positions_and_feature_rows_like_the_tokens():
    """Each CP rank's [3, T/cp] positions and feature rows are the full microbatch's at its zigzag tokens."""
    from loom.model.batch import PackedBatch
    from loom.parallel.context_parallel import shard_microbatch
    from loom.train.multimodal import with_images

    model = meta_vlm(QWEN2_5)[1]
    mb = native_microbatch(0, 1)
    full = with_images(model, PackedBatch(input_ids=mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens,
                                          max_seqlen=mb.max_seqlen), mb)
    assert full.positions.shape == (3, SEQ) and bool((full.positions[1] != full.positions[2]).any())
    slots = model.native_slots(full)
    for rank in range(2):
        batch = with_images(model, shard_microbatch(mb, 2, rank)[0], mb)
        index = batch.attn.plan.index(rank)
        assert torch.equal(batch.positions, full.positions[:, index])
        assert torch.equal(batch.image_slots, slots[index])
        assert torch.equal(batch.attn.positions.long(), mb.positions[index].long())  # the mask's 1-D positions


def test_deepstack_beyond_the_first_stage_is_refused():
    from loom.parallel.parallelize import _check_deepstack_on_first_stage

    cfg, model = meta_vlm(QWEN3 + ["parallel.pp=2", "model.num_layers=2"])
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        _check_deepstack_on_first_stage(model, cfg.parallel)
    cfg.parallel.pp = 1
    _check_deepstack_on_first_stage(model, cfg.parallel)
