"""LLaVA 1.5 HF <-> Loom, on a tiny random LlavaForConditionalGeneration built here (nothing downloaded).

Import, then Loom logits == HF logits with images (fp32, 1e-4); export after import reproduces every
tensor bit for bit, in each of the checkpoint layouts transformers reads; import, train 2 steps under
TP2 + SP on image-text data, export, and transformers loads the result with logits equal to Loom's.
"""
import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import loom  # noqa: E402
from loom.config import ModelConfig, VisionConfig  # noqa: E402
from loom.model.hf.convert import export_hf, import_hf  # noqa: E402
from loom.model.hf.llava import llava_to_hf  # noqa: E402
from loom.model.hf.naming import ConversionError  # noqa: E402
from tests.test_convert import _rewrite_weights, max_diff, read_safetensors  # noqa: E402

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64)
VISION = dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, projection_dim=16)
IMAGE_ID = 120
ATOL = 1e-4


def make_llava(path, image_token_id=IMAGE_ID, siglip=False, **top):
    """A tiny random LLaVA 1.5 (CLIP tower, Llama text model) saved as transformers saves it; ``siglip``:
    a SigLIP tower, read as LLaVA reads one (the last hidden state, every patch, no pooling head)."""
    if siglip:
        top = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full", **top}
        vision = transformers.SiglipVisionConfig(**{k: v for k, v in VISION.items() if k != "projection_dim"},
                                                 vision_use_head=False)
    else:
        top = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **top}
        vision = transformers.CLIPVisionConfig(**VISION)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT),
                                   image_token_index=image_token_id, **top)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"family": "llava"}))
    return model


def image_batch(tokens_per_image: int, image_id: int = IMAGE_ID):
    """Two sequences, three images: placeholders in runs of ``tokens_per_image`` between text tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 24), generator=gen)
    ids[ids == image_id] = 0
    for row, start in ((0, 2), (0, 6 + tokens_per_image), (1, 5)):
        ids[row, start:start + tokens_per_image] = image_id
    return ids, torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=gen)


def vlm_logits(model, ids, pixels):
    with torch.no_grad():
        out = model(ids, pixel_values=pixels)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("layer,select", [(-2, "default"), (-1, "full")])
def test_import_logits_match_with_images(tmp_path, layer, select):
    hf = make_llava(tmp_path / "hf", vision_feature_layer=layer, vision_feature_select_strategy=select)
    import_hf(tmp_path / "hf", tmp_path / "loom")
    grid = (VISION["image_size"] // VISION["patch_size"]) ** 2
    n = grid + (select == "full")
    ids, pixels = image_batch(n)
    ref = vlm_logits(hf, ids, pixels)
    for source in ("loom", "hf"):
        model = loom.from_pretrained(tmp_path / source, attn_backend="torch")
        assert model.tokens_per_image == n and model.image_token_id == IMAGE_ID
        out = vlm_logits(model, ids, pixels)
        assert out.shape == ref.shape
        assert max_diff(out, ref) <= ATOL, f"{source}: max |Loom - HF| = {max_diff(out, ref):.2e}"


def test_siglip_tower_imports_with_logit_parity_and_exports_bitwise(tmp_path):
    hf = make_llava(tmp_path / "hf", siglip=True)
    import_hf(tmp_path / "hf", tmp_path / "loom")
    model = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    v = model.cfg.vision
    assert (v.arch, v.class_token, v.patch_bias, v.post_norm, v.feature_layer) == ("siglip", False, True, False, -1)
    ids, pixels = image_batch((VISION["image_size"] // VISION["patch_size"]) ** 2)
    ref = vlm_logits(hf, ids, pixels)
    assert max_diff(vlm_logits(model, ids, pixels), ref) <= ATOL
    export_hf(tmp_path / "loom", tmp_path / "out")
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], tensor) for name, tensor in original.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]
    assert config["model_type"] == "siglip_vision_model" and config["vision_use_head"] is False


def _hub_layout(tensors):  # llava-hf on the Hub (transformers 4) nests CLIP under vision_model
    for name in [n for n in tensors if n.startswith("vision_tower.")]:
        tensors["vision_tower.vision_model." + name[len("vision_tower."):]] = tensors.pop(name)


def _state_dict_layout(tensors):  # the in-memory names of transformers >= 4.52
    for name in list(tensors):
        new = name.replace("language_model.model.", "model.language_model.")
        new = new.replace("language_model.lm_head", "lm_head")
        for part in ("vision_tower.", "multi_modal_projector."):
            new = "model." + new if new.startswith(part) else new
        tensors[new] = tensors.pop(name)


@pytest.mark.parametrize("layout", ["transformers5", "hub", "state_dict"])
def test_export_after_import_is_bitwise(tmp_path, layout):
    make_llava(tmp_path / "hf")
    if layout != "transformers5":
        _rewrite_weights(tmp_path / "hf", _hub_layout if layout == "hub" else _state_dict_layout)
    import_hf(tmp_path / "hf", tmp_path / "loom")
    export_hf(tmp_path / "loom", tmp_path / "out")
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert not (tmp_path / "out" / "loom_hf_weights.json").exists(), "Loom's side file stays in Loom"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["family"] == "llava"
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert type(config).__name__ == "LlavaConfig" and config.image_token_id == IMAGE_ID
    assert config.vision_feature_layer == -2 and config.vision_config.hidden_act == "quick_gelu"


# ----------------------------------------------------------------------------- train under TP2 + SP, then export


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    from loom.data.tokenizer import Tokenizer
    from loom.tools.make_synthetic_vqa import make_synthetic_vqa
    from loom.tools.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("vqa")
    paths = make_synthetic_vqa(root, n_train=16, n_eval=2, image_size=VISION["image_size"], seed=0)
    tok = train_tokenizer([str(paths["train"])], str(root / "tok"), vocab_size=TEXT["vocab_size"])
    return str(paths["train"]), tok, Tokenizer.load(tok).image_id


def _train_tp2(loom_dir: str, run_dir: str, train_jsonl: str, tokenizer: str) -> str:
    """Two ranks: resume from the imported weights, train 2 steps at TP2 + SP on image-text data, save."""
    from loom.config import load_config
    from loom.model.hf.convert import checkpoint_model_config
    from loom.checkpoint import storage as io
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(None, ["parallel.tp=2", "parallel.sp=true", "train.steps=2", "checkpoint.save_interval=2",
                             "train.global_batch_size=2", "data.seq_len=32", f"data.train_jsonl={train_jsonl}",
                             f"data.tokenizer={tokenizer}", "optim.warmup_steps=0", "optim.lr=1e-2",
                             f"checkpoint.resume={loom_dir}", f"train.run_dir={run_dir}", "train.log_interval=100"])
    cfg.model = checkpoint_model_config(io.read_marker(loom_dir), loom_dir)
    cfg.model.attn_backend = "torch"
    groups = build_groups(cfg)
    Trainer(cfg, groups).fit()
    groups.destroy()
    return os.path.join(run_dir, "checkpoints", "step_00000002")


def test_train_tp2_then_export_loads_in_transformers(world2, vqa, tmp_path):
    train_jsonl, tokenizer, image_id = vqa
    make_llava(tmp_path / "hf", image_token_id=image_id)
    import_hf(tmp_path / "hf", tmp_path / "loom")
    ckpt = world2.run(_train_tp2, str(tmp_path / "loom"), str(tmp_path / "run"), train_jsonl, tokenizer)[0]
    export_hf(ckpt, tmp_path / "out")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ours = loom.from_pretrained(ckpt, attn_backend="torch")
    ids, pixels = image_batch(ours.tokens_per_image, image_id)
    assert max_diff(vlm_logits(ours, ids, pixels), vlm_logits(hf, ids, pixels)) <= ATOL
    before, after = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_tower.encoder.layers.0.") for k in changed), "the vision tower trained"
    assert any(k.startswith("multi_modal_projector.") for k in changed) and any(k.startswith("language_model.")
                                                                                for k in changed)
    # Read by no feature (LLaVA reads block -2, without the final norm): frozen, so AdamW's decay leaves them alone.
    unread = ("vision_tower.post_layernorm.", "vision_tower.encoder.layers.1.")
    assert any(k.startswith(unread[1]) for k in before) and not any(k.startswith(unread) for k in changed)


CLIP = ["model.vision.class_token=true", "model.vision.pre_norm=true", "model.vision.post_norm=false",
        "model.vision.patch_bias=false", "model.vision.o_bias=true", "model.vision.mlp=quick_gelu",
        "model.vision.feature_layer=-2", "model.vision.merge=false", "model.vision.image_size=16"]


def test_clip_tower_tp2_sp_parity(world2, vqa, tmp_path):
    """The CLIP options under TP2 + SP train as at world size 1: losses, grad norms (class token and
    pre-norm counted once), first-step gradients (none for the unread last block: it is frozen) and final weights."""
    from tests.parity import assert_parity, train_layout

    train_jsonl, tokenizer, _ = vqa
    base = ["model.moe.num_experts=0", "parallel.ep=1", "model.attn_backend=torch", "train.dtype=fp32",
            f"data.train_jsonl={train_jsonl}", "data.eval_jsonl=null", f"data.tokenizer={tokenizer}",
            "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=1", f"train.run_dir={tmp_path}",
            "checkpoint.resume=none", *CLIP]
    config = "launch/configs/demo_vlm_moe.yaml"
    ref = world2.run(train_layout, config, base + ["parallel.tp=1", "parallel.sp=false"], 3, nranks=1)[0]
    out = world2.run(train_layout, config, base + ["parallel.tp=2", "parallel.sp=true"], 3)[0]
    assert_parity(ref, out)
    assert "vision.layers.1.mlp.fc1.weight" not in ref["first_grads"] and ref["first_grads"]["vision.class_embed"].any()


# ----------------------------------------------------------------------------- errors and config


def test_missing_unexpected_and_misshapen_weights_are_named(tmp_path):
    make_llava(tmp_path / "hf")
    fc2 = "vision_tower.encoder.layers.1.mlp.fc2.bias"
    _rewrite_weights(tmp_path / "hf", lambda t: t.pop(fc2))
    with pytest.raises(ConversionError, match=f"missing weight '{fc2}'"):
        import_hf(tmp_path / "hf", tmp_path / "loom")
    extra = {fc2: torch.zeros(32), "vision_tower.extra.weight": torch.zeros(2)}
    _rewrite_weights(tmp_path / "hf", lambda t: t.update(extra))
    with pytest.raises(ConversionError, match=r"unexpected weight 'vision_tower.extra.weight'"):
        import_hf(tmp_path / "hf", tmp_path / "loom")
    patch = "vision_tower.embeddings.patch_embedding.weight"

    def flatten_patch_embedding(t):
        del t["vision_tower.extra.weight"]
        t[patch] = t[patch].reshape(32, 192)

    _rewrite_weights(tmp_path / "hf", flatten_patch_embedding)
    with pytest.raises(ConversionError, match=r"patch_embedding.weight' has shape \(32, 192\), expected \(32, 3, 8, 8"):
        import_hf(tmp_path / "hf", tmp_path / "loom")
    assert not (tmp_path / "loom").exists()


@pytest.mark.parametrize("edit,message", [
    ({"vision_feature_select_strategy": "cls_only"}, "vision_feature_select_strategy='cls_only'"),
    ({"vision_feature_layer": [-2, -1]}, r"vision_feature_layer=\[-2, -1\]"),
    ({"projector_hidden_act": "silu"}, "projector_hidden_act='silu'"),
    ({"vision_config": {"model_type": "dinov2"}}, "vision_config.model_type='dinov2'"),
    ({"vision_config": {"hidden_act": "gelu"}}, "vision_config.hidden_act='gelu'"),
    ({"text_config": {"model_type": "gemma"}}, "text_config.model_type='gemma'"),
    ({"siglip": True, "vision_config": {"vision_use_head": True}}, "vision_config.vision_use_head=True"),
    ({"siglip": True, "vision_feature_select_strategy": "default"}, "vision_feature_select_strategy='default'"),
])
def test_unsupported_llava_variants_are_named(tmp_path, edit, message):
    make_llava(tmp_path, siglip=edit.get("siglip", False))
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in ((k, v) for k, v in edit.items() if k != "siglip"):
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=message):
        import_hf(tmp_path, tmp_path / "loom")


def test_export_refuses_a_vlm_llava_cannot_express():
    clip = dict(enabled=True, class_token=True, pre_norm=True, post_norm=False, patch_bias=False, o_bias=True,
                mlp="quick_gelu", feature_layer=-2)
    llava_to_hf(ModelConfig(image_token_id=3, vision=VisionConfig(**clip)), {})
    with pytest.raises(ConversionError, match="model.vision.class_token=False is not expressible"):
        llava_to_hf(ModelConfig(image_token_id=3, vision=VisionConfig(**{**clip, "class_token": False})), {})
    with pytest.raises(ConversionError, match="model.image_token_id=None"):
        llava_to_hf(ModelConfig(vision=VisionConfig(**clip)), {})


def test_clip_vision_config_tokens_and_image_token_id():
    from loom.config import ConfigError
    from loom.model.vlm import build_vlm

    v = VisionConfig(enabled=True, image_size=16, patch_size=8, class_token=True)
    assert v.tokens_per_image == 4
    assert dataclasses.replace(v, feature_select="full").tokens_per_image == 5
    with pytest.raises(ConfigError, match="model.vision.feature_layer=3"):
        VisionConfig(enabled=True, num_layers=2, feature_layer=3).validate()
    with pytest.raises(ConfigError, match="model.vision.feature_select='cls'"):
        VisionConfig(enabled=True, feature_select="cls").validate()
    with pytest.raises(ConfigError, match="model.image_token_id=300"):
        ModelConfig(image_token_id=300).validate()
    cfg = ModelConfig(image_token_id=5, vision=VisionConfig(enabled=True))
    assert build_vlm(cfg).image_token_id == 5 and build_vlm(cfg, image_token_id=5).image_token_id == 5
    with pytest.raises(ValueError, match="model.image_token_id=5 differs from the tokenizer's <image> id 6"):
        build_vlm(cfg, image_token_id=6)
