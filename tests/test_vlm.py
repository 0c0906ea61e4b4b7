"""Vision-language model at world size 1: splicing, errors, freezing, image attention masks."""
from __future__ import annotations

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.model.batch import PackedBatch
from loom.model.vision import VisionEncoder, merge_2x2, patchify
from loom.model.vlm import build_vlm
from loom.train.multimodal import freeze
from loom.train.optim import build_optimizer

IMAGE_ID = 7
VISION = ["model.vision.enabled=true", "model.vision.image_size=16", "model.vision.patch_size=4",
          "model.vision.hidden_size=16", "model.vision.intermediate_size=32", "model.vision.num_heads=2",
          "model.hidden_size=32", "model.intermediate_size=64", "model.vocab_size=64"]


def make_vlm(*overrides):
    cfg = load_config(None, VISION + list(overrides))
    cfg.validate(1)
    torch.manual_seed(0)
    return build_vlm(cfg.model, image_token_id=IMAGE_ID), cfg


def packed_batch(tokens_per_image: int):
    """Two documents: doc 0 holds image 0, doc 1 holds images 1 and 2."""
    n = tokens_per_image
    doc0 = [1, 2] + [IMAGE_ID] * n + [3, 4]
    doc1 = [5] + [IMAGE_ID] * n + [6] + [IMAGE_ID] * n + [8, 9]
    ids = torch.tensor(doc0 + doc1)
    cu = torch.tensor([0, len(doc0), len(doc0) + len(doc1)], dtype=torch.int32)
    return ids, cu


def spliced_embeddings(model, batch):
    """The LLM's input hidden states, caught at its first block."""
    seen = {}
    hook = model.llm.layers["0"].register_forward_pre_hook(lambda _m, args: seen.update(h=args[0].detach()))
    try:
        logits = model(batch)
    finally:
        hook.remove()
    return seen["h"], logits


@pytest.mark.parametrize("merge", [False, True])
def test_image_features_fill_placeholders_in_order(merge):
    model, _ = make_vlm(f"model.vision.merge={str(merge).lower()}")
    n = model.tokens_per_image
    assert n == (4 if merge else 16)
    ids, cu = packed_batch(n)
    px = torch.randn(3, 3, 16, 16)
    h, logits = spliced_embeddings(model, PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=px))
    assert logits.shape == (ids.numel(), 64)
    feats = model.image_features(px).detach()
    mask = ids == IMAGE_ID
    torch.testing.assert_close(h[mask], feats)  # k-th placeholder <- k-th feature row
    torch.testing.assert_close(h[~mask], model.llm.embed(ids[~mask]).detach())


def test_batched_input_and_logits_shape():
    model, _ = make_vlm("model.vision.merge=true")
    ids = torch.randint(10, 64, (2, 12))
    ids[0, 1:5] = IMAGE_ID
    ids[1, 6:10] = IMAGE_ID
    logits = model(ids, pixel_values=torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 12, 64)
    assert model(ids[:, 5:6].clone().fill_(3)).shape == (2, 1, 64)  # text only


def test_placeholder_mismatch_is_a_clear_error():
    model, _ = make_vlm("model.vision.merge=true")
    ids, cu = packed_batch(4)
    with pytest.raises(ValueError, match="12 image placeholder tokens .* 2 images x 4 tokens per image"):
        model(PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=torch.randn(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="model.vision.merge"):
        model(PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=torch.randn(3, 3, 16, 16),
                          image_token_counts=torch.tensor([16, 16, 16])))
    with pytest.raises(ValueError, match="12 image placeholder tokens .* 0 images"):
        model(PackedBatch(input_ids=ids, cu_seqlens=cu))
    with pytest.raises(ValueError, match="model.vision.image_size"):
        model(PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=torch.randn(3, 3, 8, 8)))


def test_attention_is_bidirectional_within_an_image_and_never_across():
    model, _ = make_vlm()
    enc: VisionEncoder = model.vision
    px = torch.randn(2, 3, 16, 16)
    base = enc(px).detach()
    changed = px.clone()
    changed[0, :, -4:, -4:] += 1.0  # only image 0's last patch
    out = enc(changed).detach()
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-4  # the first patch sees the last one
    torch.testing.assert_close(out[1], base[1], rtol=0, atol=0)  # image 1 sees nothing of image 0
    assert model.vision.layers["0"].attn.core.causal is False


def test_patchify_and_merge_keep_neighbours_together():
    px = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(px, 2)  # 4x4 grid of 2x2 patches
    assert patches.shape == (2, 16, 12)
    torch.testing.assert_close(patches[1, 5].reshape(3, 2, 2), px[1, :, 2:4, 2:4])
    merged = merge_2x2(patches, 4)  # token 1 = grid rows 0-1, cols 2-3 -> patches 2, 3, 6, 7
    torch.testing.assert_close(merged[0, 1], patches[0, [2, 3, 6, 7]].reshape(-1))


@pytest.mark.parametrize("parts", [["vision"], ["vision", "projector"], ["llm"]])
def test_freeze_gives_no_grads_and_no_optimizer_state(parts):
    model, cfg = make_vlm("model.vision.merge=true", f"finetune.freeze=[{','.join(parts)}]")
    freeze(model, cfg)
    opt = build_optimizer(model, cfg.optim)
    ids, cu = packed_batch(4)
    model(PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=torch.randn(3, 3, 16, 16))).sum().backward()
    opt.grads.finish()
    opt.step(1e-3)
    in_opt = {id(piece.param) for piece in opt.pieces}
    has_grad = {id(p) for b in opt.grads.buckets for p in b.params}
    for part in ("vision", "projector", "llm"):
        for p in getattr(model, part).parameters():
            frozen = part in parts
            assert p.grad is None and (id(p) in has_grad) != frozen and (id(p) in in_opt) != frozen, part


def test_vision_weights_that_never_run_are_frozen():
    """CLIP as LLaVA reads it: the last block and the final norm stay for conversion, untouched by AdamW."""
    model, cfg = make_vlm("model.vision.merge=true", "model.vision.num_layers=3", "model.vision.feature_layer=-2",
                          "model.vision.post_norm=false", "optim.weight_decay=0.1")
    freeze(model, cfg)
    unused = {id(p) for m in (model.vision.layers["2"], model.vision.norm) for p in m.parameters()}
    assert unused and all(not p.requires_grad for p in model.vision.parameters() if id(p) in unused)
    assert all(p.requires_grad for p in model.parameters() if id(p) not in unused)
    before = {name: p.detach().clone() for name, p in model.vision.named_parameters()}
    opt = build_optimizer(model, cfg.optim)
    ids, cu = packed_batch(4)
    model(PackedBatch(input_ids=ids, cu_seqlens=cu, pixel_values=torch.randn(3, 3, 16, 16))).sum().backward()
    opt.grads.finish()
    opt.step(1e-3)
    for name, p in model.vision.named_parameters():
        assert torch.equal(p, before[name]) == (id(p) in unused), name


def test_vision_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match="model.vision.merge=true needs an even patch grid"):
        load_config(None, VISION + ["model.vision.patch_size=16", "model.vision.merge=true"]).validate(1)
    with pytest.raises(ConfigError, match="parallel.tp=2 does not divide model.vision.num_heads=1"):
        load_config(None, VISION + ["model.vision.num_heads=1", "parallel.tp=2"]).validate(2)
    with pytest.raises(ConfigError, match="finetune.freeze entry 'vit'"):
        load_config(None, VISION + ["finetune.freeze=[vit]"]).validate(1)
    with pytest.raises(ConfigError, match=r"finetune.freeze=\[.vision.\] needs model.vision.enabled=true"):
        load_config(None, ["finetune.freeze=[vision]"]).validate(1)
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        load_config(None, VISION + ["finetune.freeze=[vision,projector,llm]"]).validate(1)


def test_positions_start_as_2d_sincos():
    """Each patch starts with its own position code, row and column apart (what shapes need early)."""
    from loom.model.vision import sincos_2d

    grid, dim = 4, 16
    pos = sincos_2d(grid, dim)
    assert pos.shape == (grid * grid, dim) and pos.abs().max() <= 1
    assert len({tuple(row.tolist()) for row in pos}) == grid * grid
    rows, cols = pos[:, :dim // 2].reshape(grid, grid, -1), pos[:, dim // 2:].reshape(grid, grid, -1)
    assert (rows == rows[:, :1]).all() and (cols == cols[:1]).all()  # half codes the row, half the column
    model, _ = make_vlm()  # 16 px images, 4 px patches: a 4 x 4 grid of width-16 features
    torch.testing.assert_close(model.vision.pos_embed.detach(), sincos_2d(grid, dim))
