"""Swappable vision towers: ``model.vision.arch`` presets, a CLIP / SigLIP tower imported on its own into a
VLM (features equal transformers' hidden states in fp32), and the quick-start task learning with two towers.
"""
import dataclasses
import json

import pytest
import torch

from loom.config import ConfigError, VisionConfig, build, load_config
from loom.config.model import VISION_ARCHS

DEMO = "launch/configs/demo_vlm_moe.yaml"
# The options as they were before arch existed: a config without arch must build exactly this tower.
OLD_DEFAULTS = dict(norm="layernorm", mlp="gelu", merge=False, eps=1e-6, class_token=False, pre_norm=False,
                    post_norm=True, patch_bias=True, o_bias=False, feature_layer=-1, feature_select="default")


def test_arch_absent_keeps_the_old_vit():
    v = VisionConfig(enabled=True)
    assert v.arch == "vit" and {k: getattr(v, k) for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert VISION_ARCHS[:3] == ("vit", "clip", "siglip")
    llava_like = VisionConfig(enabled=True, class_token=True, pre_norm=True, mlp="quick_gelu", patch_bias=False)
    assert llava_like.arch == "vit" and llava_like.class_token and llava_like.mlp == "quick_gelu"


def test_presets_fill_the_unset_options():
    clip, siglip = VisionConfig(enabled=True, arch="clip"), VisionConfig(enabled=True, arch="siglip")
    assert (clip.class_token, clip.pre_norm, clip.post_norm, clip.patch_bias, clip.o_bias, clip.mlp,
            clip.feature_layer, clip.eps) == (True, True, False, False, True, "quick_gelu", -2, 1e-5)
    assert (siglip.class_token, siglip.pre_norm, siglip.post_norm, siglip.patch_bias, siglip.o_bias, siglip.mlp,
            siglip.feature_layer) == (False, False, True, True, True, "gelu", -1)
    # How the features are read is a choice, not the architecture: an explicit value wins.
    read_last = VisionConfig(enabled=True, arch="clip", feature_layer=-1, feature_select="full")
    assert (read_last.feature_layer, read_last.feature_select, read_last.pre_norm) == (-1, "full", True)
    # A saved config (every option explicit) builds the same tower again.
    assert build(VisionConfig, dataclasses.asdict(clip), "model.vision.") == clip


def test_a_contradicting_option_or_unknown_arch_is_named():
    with pytest.raises(ConfigError, match=r"model\.vision\.mlp='gelu' contradicts model\.vision\.arch='clip'"):
        VisionConfig(arch="clip", mlp="gelu")
    with pytest.raises(ConfigError, match=r"model\.vision\.class_token=True contradicts model\.vision\.arch="):
        VisionConfig(arch="siglip", class_token=True)
    with pytest.raises(ConfigError, match=r"model\.vision\.arch='vitt' must be one of vit, clip, siglip"):
        VisionConfig(enabled=True, arch="vitt").validate()


def test_one_key_swaps_the_demo_tower(tmp_path):
    for arch, tokens in (("vit", 4), ("clip", 4), ("siglip", 4)):
        v = load_config(DEMO, [f"model.vision.arch={arch}"]).model.vision
        v.validate()
        assert v.arch == arch and v.tokens_per_image == tokens and v.hidden_size == 64
    assert load_config(DEMO, ["model.vision.arch=clip"]).model.vision.class_token


# ----------------------------------------------------------------------------- a tower from transformers

transformers = pytest.importorskip("transformers")

TOWER = dict(image_size=16, patch_size=4, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4)
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])


def _save(model, path):
    torch.manual_seed(0)
    model.save_pretrained(path)
    return model.eval()


def make_tower(kind: str, path):
    """A tiny random CLIP / SigLIP vision model (``whole``: the contrastive model with a text half)."""
    torch.manual_seed(0)
    if kind == "clip":
        return _save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER)), path)
    if kind == "siglip":
        return _save(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER)), path)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=TOWER, text_config=text))
    return _save(model, path).vision_model


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip_whole"])
def test_imported_tower_matches_transformers(tmp_path, llm_dir, kind):
    import loom
    from loom.tools.convert_hf import main as convert_cli

    hf = make_tower(kind, tmp_path / "tower")
    assert convert_cli(["import", "--hf", str(llm_dir), "--vision-from", str(tmp_path / "tower"),
                        "--out", str(tmp_path / "loom")]) == 0
    model = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    v = model.cfg.vision
    assert v.arch == kind.split("_")[0] and (v.hidden_size, v.num_layers, v.image_size, v.patch_size) == (48, 3, 16, 4)
    # The projector adapts: the tower's width in, the LLM's out.
    assert (model.projector.fc1.in_features, model.projector.fc2.out_features) == (48, 32)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.vision(pixels)
        out = hf(pixel_values=pixels, output_hidden_states=True)
    # CLIP as LLaVA reads it: hidden state -2 without the class token; SigLIP: last_hidden_state.
    ref = out.hidden_states[-2][:, 1:] if kind == "clip" else out.last_hidden_state
    assert ours.shape == ref.shape == (3, 16, 48)
    assert float((ours - ref).abs().max()) <= 1e-5
    llama = transformers.LlamaForCausalLM.from_pretrained(llm_dir)
    assert torch.equal(model.llm.embed.weight, llama.model.embed_tokens.weight)
    marker = json.loads((tmp_path / "loom" / "checkpoint.json").read_text())
    assert marker["source"]["vision_from"] == str(tmp_path / "tower")


def test_a_swapped_tower_exports_as_llava(tmp_path, llm_dir):
    """The tower's VLM exports as LlavaForConditionalGeneration with the LLM's config as its text_config;
    SigLIP once it is read as LLaVA reads a tower (before its final norm), and not before."""
    import loom
    from loom.model.hf.convert import export_hf, import_hf
    from loom.model.hf.naming import ConversionError

    gen, image = torch.Generator().manual_seed(2), TEXT["vocab_size"] - 1

    def save_as_trained(ckpt, **vision):  # what a run that trained the VLM writes: its tokenizer's <image> id
        marker = json.loads((ckpt / "checkpoint.json").read_text())
        marker["config"]["model"]["image_token_id"] = image
        marker["config"]["model"]["vision"].update(vision)
        (ckpt / "checkpoint.json").write_text(json.dumps(marker))

    for kind in ("clip", "siglip"):
        make_tower(kind, tmp_path / kind)
        ckpt = import_hf(llm_dir, tmp_path / f"loom_{kind}", vision_from=tmp_path / kind)
        save_as_trained(ckpt)
        if kind == "siglip":
            with pytest.raises(ConversionError, match="model.vision.post_norm=True is not expressible"):
                export_hf(ckpt, tmp_path / "refused")
            save_as_trained(ckpt, post_norm=False)
        model = loom.from_pretrained(ckpt, attn_backend="torch")
        export_hf(ckpt, tmp_path / f"out_{kind}")
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / f"out_{kind}").eval()
        assert hf.config.text_config.hidden_size == TEXT["hidden_size"]
        n = model.tokens_per_image
        ids = torch.randint(0, image, (1, 2 * n + 6), generator=gen)
        ids[0, 2:2 + n] = ids[0, 4 + n:4 + 2 * n] = image
        pixels = torch.randn(2, 3, 16, 16, generator=gen)
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels).logits
            ours = model(ids, pixel_values=pixels)
        assert float((ours - ref).abs().max()) <= 1e-4, kind


def test_a_llava_gets_a_new_tower_and_projector(tmp_path):
    import loom
    from loom.model.hf.convert import import_hf
    from tests.test_convert_llava import make_llava

    llava = make_llava(tmp_path / "llava")
    make_tower("siglip", tmp_path / "tower")
    import_hf(tmp_path / "llava", tmp_path / "loom", vision_from=tmp_path / "tower")
    model = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    assert model.cfg.vision.arch == "siglip" and model.projector.fc1.in_features == 48
    assert model.image_token_id == llava.config.image_token_id
    text = llava.model.language_model
    assert torch.equal(model.llm.layers["1"].attn.q_proj.weight, text.layers[1].self_attn.q_proj.weight)


def test_llava_import_names_its_clip_tower():
    from loom.model.hf.llava import _vision_from_hf

    vision = dict(TOWER, model_type="clip_vision_model")
    assert _vision_from_hf({"vision_config": vision}).arch == "clip"
    tanh = _vision_from_hf({"vision_config": {**vision, "hidden_act": "gelu_pytorch_tanh"}})
    assert (tanh.arch, tanh.mlp, tanh.class_token) == ("vit", "gelu", True)  # not CLIP's activation


def test_tower_errors_name_the_field_or_weight(tmp_path, llm_dir):
    from loom.model.hf.convert import import_hf
    from loom.model.hf.naming import ConversionError

    make_tower("clip", tmp_path / "tower")
    config = json.loads((tmp_path / "tower" / "config.json").read_text())
    (tmp_path / "tower" / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ConversionError, match=r"hidden_act='gelu' is not supported"):
        import_hf(llm_dir, tmp_path / "out", vision_from=tmp_path / "tower")
    (tmp_path / "tower" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(ConversionError, match=r"unexpected weight .*layers\.2\."):
        import_hf(llm_dir, tmp_path / "out", vision_from=tmp_path / "tower")
    (tmp_path / "tower" / "config.json").write_text(json.dumps({**config, "model_type": "dinov2"}))
    with pytest.raises(ConversionError, match=r"model_type='dinov2' is not a supported vision tower"):
        import_hf(llm_dir, tmp_path / "out", vision_from=tmp_path / "tower")


# ----------------------------------------------------------------------------- the quick-start task, two towers


@pytest.mark.slow
def test_quickstart_task_learns_with_siglip(tmp_path):
    """The other tower of the pair: tests/test_demo_learns.py trains Loom's ViT on the same task, same settings."""
    from loom.tools import bench_backbones

    results = bench_backbones.run(["siglip"], tmp_path)
    print("\n" + bench_backbones.table(results))
    for r in results:
        assert r["accuracy"]["overall"] >= 0.9, r
        assert r["blank_image_accuracy"]["overall"] < 0.5, r
