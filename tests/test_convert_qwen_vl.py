"""Qwen2.5-VL and Qwen3-VL HF <-> Loom, on tiny random models built here (nothing downloaded).

Import, then Loom logits == HF logits (fp32, within 1e-4 of the largest logit) for a batch holding two images of different
sizes and a 4-frame video: for Qwen2.5-VL with window attention spanning several windows per
image and one full-attention block, for Qwen3-VL with learned positions resized up and down and
DeepStack features joining two LLM layers; export after import reproduces every tensor bit for
bit, in both layouts transformers reads; unsupported config fields are named.
"""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import loom  # noqa: E402
from loom.config import ConfigError, ModelConfig, VisionConfig  # noqa: E402
from loom.model.hf import load_hf_state_dict  # noqa: E402
from loom.model.hf.convert import export_hf, import_hf  # noqa: E402
from loom.model.hf.naming import ConversionError  # noqa: E402
from loom.model.hf.qwen_vl import qwen_vl_from_hf  # noqa: E402
from loom.model.vlm import build_vlm  # noqa: E402
from tests.test_convert import _rewrite_weights, max_diff, read_safetensors  # noqa: E402

# initializer_range: text weights large enough that a position error shows far above the tolerance (swapping
# M-RoPE's height and width moves the logits by 9% of the largest; a correct import by 2e-6).
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
# A window is 16 px = 2x2 merged tokens = 4x4 patches, so every image below spans several; block 1 attends fully.
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, window_size=16, fullatt_block_indexes=[1], out_hidden_size=64,
              tokens_per_second=2, initializer_range=0.2)  # weights large enough that every nonlinearity shows
IMAGE, VIDEO = 120, 121
PATCH = 3 * 2 * 4 * 4
RTOL = 1e-4  # of the largest |logit|: fp32 summation order, not a margin a wrong position could hide in


def rel_diff(out, ref) -> float:
    return max_diff(out, ref) / float(ref.abs().max())


def make_qwen_vl(path, **top):
    cfg = transformers.Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
                                        video_token_id=VIDEO, vision_start_token_id=122, vision_end_token_id=123,
                                        **top)
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"family": "qwen2_5_vl"}))
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(the HF model, its saved directory), built once for the module."""
    path = tmp_path_factory.mktemp("qwen_vl") / "hf"
    return make_qwen_vl(path), path


def copy_of(tiny, tmp_path):
    shutil.copytree(tiny[1], tmp_path / "hf")
    return tmp_path / "hf"


def media_batch(frame_text: bool = False):
    """Two left-padded rows: row 0 has images of 4x6 and 8x8 patches and a video of 4 frames (2 temporal
    patches of 4x4), row 1 an image of 4x4 patches; text between them (``frame_text``: between the video's
    temporal patches too, as Qwen3-VL's timestamps)."""
    gen = torch.Generator().manual_seed(1)
    image_grid = torch.tensor([[1, 4, 6], [1, 8, 8], [1, 4, 4]])
    video_grid = torch.tensor([[2, 4, 4]])
    video = [VIDEO] * 4 + [7] * frame_text + [VIDEO] * 4
    row0 = [1, 2, 3] + [IMAGE] * 6 + [4, 5] + [IMAGE] * 16 + [6] + video + [7, 8, 9]
    row1 = [10, 11] + [IMAGE] * 4 + [12, 13, 14]
    pad = len(row0) - len(row1)
    ids = torch.tensor([row0, [0] * pad + row1])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=torch.randn(int(image_grid.prod(-1).sum()), PATCH, generator=gen),
                image_grid_thw=image_grid,
                pixel_values_videos=torch.randn(int(video_grid.prod(-1).sum()), PATCH, generator=gen),
                video_grid_thw=video_grid)


def processed(batch):
    """``batch`` as the processor hands it to transformers: with mm_token_type_ids (1 image, 2 video)."""
    ids = batch["input_ids"]
    return {**batch, "mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}


def hf_logits(model, batch):
    with torch.no_grad():
        return model(**processed(batch)).logits


def loom_logits(model, batch):
    with torch.no_grad():
        return model(**processed(batch))  # called exactly as transformers' model is


def test_import_logits_match_with_images_of_two_sizes_and_a_video(tiny, tmp_path):
    hf, path = tiny
    import_hf(path, tmp_path / "loom")
    batch = {**media_batch(), "second_per_grid_ts": torch.tensor([1.75])}  # video positions step 2 * 1.75, floored
    ref = hf_logits(hf, batch)
    keep = batch["attention_mask"].bool()
    for source in (tmp_path / "loom", path):
        model = loom.from_pretrained(source, attn_backend="torch")
        out = loom_logits(model, batch)
        assert out.shape == ref.shape
        err = rel_diff(out[keep], ref[keep])
        assert err <= RTOL, f"{source}: max |Loom - HF| / max |HF| = {err:.3g}"
        assert not out[~keep].any()


def test_mm_token_type_ids_must_mark_the_placeholders(tiny):
    model = loom.from_pretrained(tiny[1], attn_backend="torch")
    batch = processed(media_batch())
    types = batch["mm_token_type_ids"].clone()
    types[0, 3] = 2  # an image placeholder marked as a video token
    wrong = "marks 25 token.s. as type 1, but input_ids hold 26 of its placeholder id"
    with torch.no_grad(), pytest.raises(ValueError, match=wrong):
        model(**{**batch, "mm_token_type_ids": types})
    types = batch["mm_token_type_ids"].clone()
    types[0, 0] = 3  # a kind this model has no placeholder for
    with torch.no_grad(), pytest.raises(ValueError, match="marks 1 token.s. as type 3, but input_ids hold 0"):
        model(**{**batch, "mm_token_type_ids": types})


def test_tower_is_image_count_agnostic(tiny):
    """Each frame / window is its own varlen document: images run together give what each gives alone."""
    hf = tiny[0]
    cfg = qwen_vl_from_hf(hf.config.to_dict())
    with torch.device("meta"):
        model = build_vlm(cfg)
    model.to_empty(device="cpu")
    load_hf_state_dict(model, hf.state_dict())  # transformers' in-memory names
    batch = media_batch()
    grid, pixels = batch["image_grid_thw"], batch["pixel_values"]
    with torch.no_grad():
        together = model.projector(model.vision(pixels, grid))
        alone = [model.projector(model.vision(p, g[None])) for p, g in
                 zip(pixels.split(grid.prod(-1).tolist()), grid)]
    assert max_diff(together, torch.cat(alone)) <= 1e-5


def _state_dict_layout(tensors):  # transformers 5's in-memory names
    for name in list(tensors):
        new = "model.language_model." + name[len("model."):] if name.startswith("model.") else name
        new = "model." + new if new.startswith("visual.") else new
        tensors[new] = tensors.pop(name)


@pytest.mark.parametrize("layout", ["saved", pytest.param("state_dict", marks=pytest.mark.slow)])
def test_export_after_import_is_bitwise(tiny, tmp_path, layout):
    hf, path = tiny[0], copy_of(tiny, tmp_path)
    if layout == "state_dict":
        _rewrite_weights(path, _state_dict_layout)
    import_hf(path, tmp_path / "loom")
    export_hf(tmp_path / "loom", tmp_path / "out", max_shard_bytes=40_000)  # several shards: qkv blocks stay together
    original, exported = read_safetensors(path), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["family"] == "qwen2_5_vl"
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert back.config.vision_config.fullatt_block_indexes == [1] and back.config.video_token_id == VIDEO
    batch = media_batch()
    keep = batch["attention_mask"].bool()
    assert max_diff(hf_logits(back, batch)[keep], hf_logits(hf, batch)[keep]) == 0


@pytest.mark.parametrize("section,edit,message", [
    ("vision_config", {"hidden_act": "gelu"}, "vision_config.hidden_act='gelu'"),
    ("vision_config", {"in_channels": 1}, "vision_config.in_channels=1"),
    ("vision_config", {"out_hidden_size": 32}, "vision_config.out_hidden_size=32"),
    ("vision_config", {"depth": None}, "vision_config.depth is missing"),
    ("text_config", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
     "text_config.rope_parameters.rope_type='yarn'"),
    ("text_config", {"use_sliding_window": True}, "text_config.use_sliding_window=true"),
])
def test_unsupported_config_fields_are_named(tiny, tmp_path, section, edit, message):
    path = copy_of(tiny, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[section].update(edit)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        import_hf(path, tmp_path / "loom")


def _qwen_vision(**kw):
    return VisionConfig(**{**dict(enabled=True, arch="qwen2_5_vl", patch_size=4, hidden_size=32, num_heads=2,
                                  window_size=16, fullatt_block_indexes=[1], num_layers=2), **kw})


@pytest.mark.parametrize("kw,message", [
    (dict(arch="qwen3"), "model.vision.arch='qwen3' must be one of"),
    (dict(window_size=4), "model.vision.window_size=4"),
    (dict(fullatt_block_indexes=[2]), r"model.vision.fullatt_block_indexes=\[2\]"),
    (dict(hidden_size=24, num_heads=4), "must be a multiple of 4"),
    (dict(arch="clip", class_token=False), "model.vision.class_token=False contradicts model.vision.arch='clip'"),
])
def test_vision_arch_config_errors_name_the_field(kw, message):
    with pytest.raises(ConfigError, match=message):
        _qwen_vision(**kw).validate()


@pytest.mark.parametrize("arch", [pytest.param("qwen2_5_vl", marks=pytest.mark.slow), "qwen3_vl"])
def test_a_random_native_resolution_vlm_trains_every_parameter(arch):
    """Built from a Loom config (random init), an image and a video: every weight gets a gradient."""
    extra = dict(norm="layernorm", mlp="gelu", num_position_embeddings=16, deepstack_visual_indexes=[0]) \
        if arch == "qwen3_vl" else {}
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_heads=4, mrope_section=[2, 3, 3],
                      mrope_interleaved=arch == "qwen3_vl", image_token_id=IMAGE, video_token_id=VIDEO,
                      vision=_qwen_vision(arch=arch, **extra))
    cfg.validate()
    torch.manual_seed(0)
    model = build_vlm(cfg)
    ids = torch.tensor([[1] + [IMAGE] * 4 + [2] + [VIDEO] * 8 + [3]])
    out = model(ids, pixel_values=torch.randn(16, PATCH), image_grid_thw=torch.tensor([[1, 4, 4]]),
                pixel_values_videos=torch.randn(32, PATCH), video_grid_thw=torch.tensor([[2, 4, 4]]))
    out.square().mean().backward()
    assert out.shape == (1, 15, 128)
    assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]


@pytest.mark.slow
def test_config_of_a_loom_built_qwen3_vl_builds_the_same_model_in_transformers():
    """Export of a model never imported: the HF config from Loom's alone gives transformers the same model."""
    from loom.model.hf import family_for_model

    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                      mrope_section=[2, 3, 3], mrope_interleaved=True, image_token_id=IMAGE, video_token_id=VIDEO,
                      vision=_qwen_vision(arch="qwen3_vl", norm="layernorm", mlp="gelu", num_position_embeddings=16,
                                          deepstack_visual_indexes=[0], fullatt_block_indexes=[]))
    family = family_for_model(cfg)
    hf = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(**family.config_to_hf(cfg, {})))
    model = build_vlm(cfg)
    load_hf_state_dict(model, hf.eval().state_dict())
    batch = media_batch(frame_text=True)
    keep = batch["attention_mask"].bool()
    err = rel_diff(loom_logits(model, batch)[keep], hf_logits(hf, batch)[keep])
    assert err <= RTOL, f"max |Loom - HF| / max |HF| = {err:.3g}"


def test_mrope_section_and_placeholders_are_checked():
    with pytest.raises(ConfigError, match=r"model.mrope_section=\[2, 2, 2\]"):
        ModelConfig(hidden_size=64, num_heads=4, mrope_section=[2, 2, 2]).validate()
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_heads=4, mrope_section=[2, 3, 3], image_token_id=IMAGE,
                      video_token_id=VIDEO, vision=_qwen_vision())
    cfg.validate()
    model = build_vlm(cfg)
    ids = torch.tensor([[1] + [IMAGE] * 3 + [2]])
    with pytest.raises(ValueError, match="input_ids hold 3 image placeholder tokens .* make 4 tokens"):
        model(ids, pixel_values=torch.randn(16, PATCH), image_grid_thw=torch.tensor([[1, 4, 4]]))


# ----------------------------------------------------------------------------- Qwen3-VL

TEXT3 = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "mrope_section": [2, 3, 3]})
# A 6x6 table of learned positions, resized to 4x6, 8x8 and 4x4 grids; blocks 0 and 1 feed DeepStack.
VISION3 = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
               spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36, deepstack_visual_indexes=[1, 0],
               initializer_range=0.2)  # weights large enough that a wrong activation shows in the logits


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_vl") / "hf"
    cfg = transformers.Qwen3VLConfig(text_config=TEXT3, vision_config=VISION3, image_token_id=IMAGE,
                                     video_token_id=VIDEO, vision_start_token_id=122, vision_end_token_id=123)
    torch.manual_seed(0)
    model = transformers.Qwen3VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return model, path


def test_qwen3_vl_logits_match_and_export_is_bitwise(tiny3, tmp_path):
    hf, path = tiny3
    import_hf(path, tmp_path / "loom")
    batch = media_batch(frame_text=True)
    ref, keep = hf_logits(hf, batch), batch["attention_mask"].bool()
    model = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    assert model.cfg.vision.arch == "qwen3_vl" and model.cfg.mrope_interleaved
    out = loom_logits(model, batch)
    err = rel_diff(out[keep], ref[keep])
    assert err <= RTOL, f"max |Loom - HF| / max |HF| = {err:.3g}"
    export_hf(tmp_path / "loom", tmp_path / "out")
    original, exported = read_safetensors(path), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert type(config).__name__ == "Qwen3VLConfig" and config.vision_config.deepstack_visual_indexes == [1, 0]


def test_qwen3_vl_unsupported_config_fields_are_named(tiny3, tmp_path):
    path = copy_of(tiny3, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "silu"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="vision_config.hidden_act='silu'"):
        import_hf(path, tmp_path / "loom")
    config["vision_config"]["hidden_act"] = "gelu_pytorch_tanh"
    config["text_config"]["attention_bias"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="text_config.attention_bias=true"):
        import_hf(path, tmp_path / "loom")
