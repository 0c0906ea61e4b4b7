"""HF <-> Loom conversion swept over config variants of every text family (tiny random models, fp32).

Each variant: import, Loom logits == transformers logits (max abs 1e-4); export reproduces every
tensor bit for bit; transformers reads the exported config.json with the same semantics (its
logits on the exported directory are the original's exactly). The variants cover, per family
where it applies: top-k 1, 2 and all experts; norm_topk_prob on and off; tied and untied
embeddings; 1, 2 and all query heads per KV head; odd vocabularies; head_dim != hidden/heads;
a leading dense layer. Not the cartesian product: each value of each axis appears in each family.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import loom  # noqa: E402
from loom.config import ModelConfig, MoEConfig  # noqa: E402
from loom.model.decoder import build_model  # noqa: E402
from loom.model.hf import MIXTRAL, QWEN3_MOE, family_for_model, load_hf_state_dict, model_config_from_hf  # noqa: E402
from loom.model.hf.convert import import_hf  # noqa: E402
from loom.model.hf.naming import ConversionError  # noqa: E402
from loom.model.moe import route  # noqa: E402
from tests.test_convert import assert_exports_bitwise, logits, max_diff, read_safetensors  # noqa: E402
from loom.tools.convert_hf import main as convert_cli  # noqa: E402

HEADS, SEQ, ATOL = 4, 16, 1e-4
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS, rms_norm_eps=1e-6,
            max_position_embeddings=64)
SHORT = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
         "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}
KV_NAMES = {HEADS: "mha", HEADS // 2: "gqa2", 1: "mqa"}
EXPERTS = 4


def variant(arch, kv=2, tied=False, vocab=128, head_dim=None, top_k=None, norm=None, dense0=False):
    """One HF config (keyword arguments) with a readable id: family-kv-tying-vocab[-hd][-topk][-norm][-dense0]."""
    hf = dict(BASE, vocab_size=vocab, num_key_value_heads=kv, tie_word_embeddings=tied)
    parts = [SHORT[arch], KV_NAMES[kv], "tied" if tied else "untied", f"v{vocab}"]
    if arch == "Qwen3ForCausalLM" and head_dim is None:
        head_dim = BASE["hidden_size"] // HEADS  # its config defaults to 128, not hidden/heads
    elif head_dim is not None:
        parts.append(f"hd{head_dim}")
    if head_dim is not None:
        hf["head_dim"] = head_dim
    if top_k is not None:
        hf["num_experts_per_tok"] = top_k
        parts.append("topall" if top_k == EXPERTS else f"top{top_k}")
        if arch == "MixtralForCausalLM":
            hf["num_local_experts"] = EXPERTS
        else:
            hf.update(num_experts=EXPERTS, moe_intermediate_size=16, norm_topk_prob=norm,
                      mlp_only_layers=[0] if dense0 else [])
            parts.append("norm" if norm else "nonorm")
            if arch == "Qwen2MoeForCausalLM":
                hf["shared_expert_intermediate_size"] = 32
            if dense0:
                parts.append("dense0")
    return pytest.param(arch, hf, id="-".join(parts))


VARIANTS = [
    variant("LlamaForCausalLM", kv=4, vocab=97),
    variant("LlamaForCausalLM", kv=2, tied=True),
    variant("LlamaForCausalLM", kv=1, vocab=131, head_dim=16),
    variant("Qwen2ForCausalLM", kv=4, tied=True, vocab=131),
    variant("Qwen2ForCausalLM", kv=2, head_dim=16),
    variant("Qwen2ForCausalLM", kv=1, vocab=97),
    variant("Qwen3ForCausalLM", kv=4, vocab=97),
    variant("Qwen3ForCausalLM", kv=2, tied=True, head_dim=16),
    variant("Qwen3ForCausalLM", kv=1, vocab=131, head_dim=16),
    variant("MixtralForCausalLM", kv=4, vocab=97, top_k=1),
    variant("MixtralForCausalLM", kv=2, tied=True, top_k=1),
    variant("MixtralForCausalLM", kv=2, vocab=131, top_k=2),
    variant("MixtralForCausalLM", kv=1, head_dim=16, top_k=EXPERTS),
    variant("Qwen2MoeForCausalLM", kv=4, vocab=97, top_k=1, norm=True, dense0=True),
    variant("Qwen2MoeForCausalLM", kv=2, tied=True, top_k=1, norm=False),
    variant("Qwen2MoeForCausalLM", kv=1, vocab=131, top_k=2, norm=False, dense0=True),
    variant("Qwen2MoeForCausalLM", kv=2, head_dim=16, top_k=EXPERTS, norm=True),
    variant("Qwen3MoeForCausalLM", kv=1, tied=True, top_k=1, norm=True),
    variant("Qwen3MoeForCausalLM", kv=4, vocab=97, top_k=1, norm=False, dense0=True),
    variant("Qwen3MoeForCausalLM", kv=2, vocab=131, top_k=2, norm=True, dense0=True),
    variant("Qwen3MoeForCausalLM", kv=2, head_dim=16, top_k=EXPERTS, norm=False),
]


def make_hf(arch: str, hf_kwargs: dict, path):
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf_kwargs)
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch,hf_kwargs", VARIANTS)
def test_variant_imports_exact_and_exports_bitwise(arch, hf_kwargs, tmp_path):
    hf = make_hf(arch, hf_kwargs, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "loom")
    ids = torch.randint(0, hf_kwargs["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = logits(hf, ids)
    out = logits(loom.from_pretrained(tmp_path / "loom", attn_backend="torch"), ids)
    assert out.shape == ref.shape
    assert max_diff(out, ref) <= ATOL, f"max |Loom - HF| = {max_diff(out, ref):.2e}"

    assert_exports_bitwise(tmp_path)
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reread).__name__ == arch
    assert torch.equal(logits(reread, ids), ref), "the exported config.json means another model to transformers"

    # A model trained in Loom has no imported config.json to start from: the Loom config alone must do.
    cfg = model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    (tmp_path / "out" / "config.json").write_text(json.dumps(family_for_model(cfg, arch).config_to_hf(cfg, {})))
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(fresh, ids), ref), "a config.json built from the Loom config means another model"


# ----------------------------------------------------------------------------- keys a config.json leaves out

# Keys transformers fills with a per-family default when config.json lacks them; a model built with
# those defaults, its config.json stripped of them, must import as the model transformers loads.
OPTIONAL = ("rms_norm_eps", "rope_parameters", "rope_theta", "head_dim", "tie_word_embeddings", "norm_topk_prob")
ONE_PER_FAMILY = [pytest.param(*v.values, id=SHORT[v.values[0]])
                  for v in VARIANTS if v is next(w for w in VARIANTS if w.values[0] == v.values[0])]


@pytest.mark.parametrize("arch,hf_kwargs", ONE_PER_FAMILY)
def test_left_out_keys_take_the_family_defaults(arch, hf_kwargs, tmp_path):
    kept = {k: v for k, v in hf_kwargs.items() if k not in OPTIONAL}
    hf = make_hf(arch, kept, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k not in OPTIONAL}))
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, kept["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(reread, ids), logits(hf, ids)), "the stripped config.json changed the HF model"
    import_hf(tmp_path / "hf", tmp_path / "loom")
    out = logits(loom.from_pretrained(tmp_path / "loom", attn_backend="torch"), ids)
    assert max_diff(out, logits(hf, ids)) <= ATOL, f"max |Loom - HF| = {max_diff(out, logits(hf, ids)):.2e}"


# ----------------------------------------------------------------------------- refusals and missing keys


@pytest.mark.parametrize("arch,hf_kwargs", ONE_PER_FAMILY)
def test_missing_required_keys_are_named(arch, hf_kwargs, tmp_path):
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**hf_kwargs)
    cfg.architectures = [arch]
    cfg.save_pretrained(tmp_path)
    full = json.loads((tmp_path / "config.json").read_text())
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
    required += {"MixtralForCausalLM": [("num_local_experts", "num_experts")],
                 "Qwen2MoeForCausalLM": ["num_experts", "moe_intermediate_size", "shared_expert_intermediate_size"],
                 "Qwen3MoeForCausalLM": [("num_experts", "num_local_experts"), "moe_intermediate_size"]}.get(arch, [])
    for key in required:
        spellings = key if isinstance(key, tuple) else (key,)  # the family reads either
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in full.items() if k not in spellings}))
        with pytest.raises(ConversionError, match=rf"^config.json: {spellings[0]}( \(or \w+\))? is missing$"):
            import_hf(tmp_path, tmp_path / "loom")
    (tmp_path / "config.json").write_text(json.dumps({**full, "vocab_size": None, "hidden_size": None}))
    with pytest.raises(ConversionError, match=r"^config.json: vocab_size, hidden_size are missing$"):
        import_hf(tmp_path, tmp_path / "loom")
    assert convert_cli(["import", "--hf", str(tmp_path), "--out", str(tmp_path / "loom")]) == 2
    assert not (tmp_path / "loom").exists()


def test_llava_names_the_missing_text_key(tmp_path):
    text = transformers.Qwen2Config(**dict(BASE, vocab_size=128, num_key_value_heads=2)).to_dict()
    del text["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"],
                                                      "text_config": text}))
    with pytest.raises(ConversionError, match=r"^config.json: text_config.vocab_size is missing$"):
        import_hf(tmp_path, tmp_path / "loom")


def test_mixtral_sliding_window_is_refused(tmp_path):
    cfg = transformers.MixtralConfig(**dict(BASE, vocab_size=128, num_local_experts=4, sliding_window=8))
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match=r"config.json: sliding_window=8 is not supported"):
        import_hf(tmp_path, tmp_path / "loom")


# ----------------------------------------------------------------------------- top-1 routing


def test_top1_weight_is_renormalised_only_under_norm_top1_prob():
    router_logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    native = route(router_logits, MoEConfig(num_experts=4, top_k=1))
    torch.testing.assert_close(native.weights, torch.softmax(router_logits, -1).max(-1, keepdim=True).values)
    native.weights.sum().backward()
    assert router_logits.grad.abs().sum() > 0, "a single choice keeps its probability, so the router trains"
    hf_like = route(router_logits, MoEConfig(num_experts=4, top_k=1, norm_top1_prob=True))
    assert torch.equal(hf_like.weights, torch.ones(8, 1)) and torch.equal(hf_like.experts, native.experts)


def _moe_cfg(top_k, norm_top1_prob, **model):
    moe = MoEConfig(num_experts=EXPERTS, top_k=top_k, intermediate_size=16, norm_top1_prob=norm_top1_prob)
    return ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=HEADS, num_kv_heads=2,
                       moe=moe, **model)


@pytest.mark.parametrize("top_k,norm_top1_prob", [(1, False), (1, True), (2, False)])
def test_loom_routing_exports_as_qwen_with_the_same_semantics(top_k, norm_top1_prob, tmp_path):
    """A Loom-native MoE: the exported norm_topk_prob is the renormalisation Loom does."""
    cfg = _moe_cfg(top_k, norm_top1_prob, qk_norm=True, attn_backend="torch")
    hf_cfg = QWEN3_MOE.config_to_hf(cfg, {})
    assert hf_cfg["norm_topk_prob"] is (top_k > 1 or norm_top1_prob)
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**hf_cfg)).eval()
    hf.save_pretrained(tmp_path)  # on disk, experts are separate tensors (in memory, fused)
    model = build_model(cfg).eval()
    load_hf_state_dict(model, read_safetensors(tmp_path), QWEN3_MOE)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    assert max_diff(logits(model, ids), logits(hf, ids)) <= ATOL


def test_top1_without_renormalisation_is_not_mixtral():
    with pytest.raises(ConversionError, match=r"model.moe.norm_top1_prob=False is not expressible as Mixtral"):
        MIXTRAL.config_to_hf(_moe_cfg(1, False), {})
    assert MIXTRAL.config_to_hf(_moe_cfg(1, True), {})["num_experts_per_tok"] == 1
