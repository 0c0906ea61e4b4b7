"""HF <-> Loom conversion for every family, on tiny random HF models built here (nothing downloaded).

Per family: import, then Loom logits == HF logits (fp32, 1e-4); export after import reproduces every
tensor bit for bit; import, train 2 steps under TP2 (+SP for MoE), export, and transformers loads
the result with logits equal to Loom's.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import loom  # noqa: E402
from loom.model.hf.convert import export_hf, import_hf  # noqa: E402
from loom.model.hf.naming import ConversionError  # noqa: E402
from loom.tools.convert_hf import main as convert_cli  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64)
FAMILIES = {
    "LlamaForCausalLM": {},
    "Qwen2ForCausalLM": {},
    "Qwen3ForCausalLM": {"head_dim": 16, "tie_word_embeddings": True},
    "MixtralForCausalLM": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # Layer 0 dense (mlp_only_layers), layer 1 MoE with a gated shared expert; top-k not renormalised.
    "Qwen2MoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                            "shared_expert_intermediate_size": 32, "mlp_only_layers": [0]},
    "Qwen3MoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                            "head_dim": 16, "norm_topk_prob": True},
}
ATOL = 1e-4


def make_hf(arch: str, path, dtype=torch.float32):
    """A tiny random HF model saved as safetensors (with a tokenizer side file); returns the model."""
    cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**BASE, **FAMILIES[arch])
    cfg.architectures = [arch]
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    model.to(dtype).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "family": arch}))
    return model.float()


def read_safetensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def assert_exports_bitwise(tmp_path) -> None:
    """Export ``tmp_path/loom`` to ``tmp_path/out``: the same tensors as ``tmp_path/hf``, names, dtypes and bits."""
    export_hf(tmp_path / "loom", tmp_path / "out")
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_import_logits_and_bitwise_export(arch, tmp_path):
    hf = make_hf(arch, tmp_path / "hf")
    assert convert_cli(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "loom")]) == 0
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    ref = logits(hf, ids)
    for source in ("loom", "hf"):  # a Loom checkpoint, and the HF directory directly
        model = loom.from_pretrained(tmp_path / source, attn_backend="torch")
        out = logits(model, ids)
        assert out.shape == (2, 12, BASE["vocab_size"])
        assert max_diff(out, ref) <= ATOL, f"{arch} from {source}: max |Loom - HF| = {max_diff(out, ref):.2e}"

    assert_exports_bitwise(tmp_path)
    side = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert side["family"] == arch, "tokenizer files travel with the checkpoint"


def test_called_as_transformers_calls_a_model(tmp_path):
    """``model(**tokenizer(...))``: input_ids as a keyword, attention_mask padding either side, token_type_ids."""
    hf = make_hf("LlamaForCausalLM", tmp_path / "hf")
    ours = loom.from_pretrained(tmp_path / "hf", attn_backend="torch")
    ids = torch.randint(0, BASE["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding: the row's positions start at its first token, as generate gives them
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        out = ours(**inputs)
    keep = mask.bool()
    assert out.shape == ref.shape and max_diff(out[keep], ref[keep]) <= ATOL and not out[~keep].any()
    assert torch.equal(ours(ids), ours(input_ids=ids))
    with pytest.raises(TypeError, match="pass the tokens once"):
        ours(ids, input_ids=ids)
    with pytest.raises(TypeError, match=r"unexpected inputs \['past_key_values'\]"):
        ours(input_ids=ids, past_key_values=object())
    with pytest.raises(ValueError, match="token_type_ids marks a second segment"):
        ours(input_ids=ids, token_type_ids=torch.ones_like(ids))


def test_bf16_sharded_round_trip(tmp_path):
    """bf16 weights survive import/export bit for bit; small shards give an index transformers reads."""
    make_hf("MixtralForCausalLM", tmp_path / "hf", dtype=torch.bfloat16)
    import_hf(tmp_path / "hf", tmp_path / "loom")
    export_hf(tmp_path / "loom", tmp_path / "out", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    original, exported = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], v) and exported[k].dtype == torch.bfloat16 for k, v in original.items())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, BASE["vocab_size"], (1, 8))
    ours = loom.from_pretrained(tmp_path / "loom", attn_backend="torch")
    assert max_diff(logits(ours, ids), logits(reloaded, ids)) <= ATOL


# ----------------------------------------------------------------------------- train under TP2, then export


def _train_tp2(loom_dir: str, run_dir: str) -> str:
    """Two ranks: resume from the imported weights, train 2 steps at TP2 (SP for MoE), save."""
    from loom.config import load_config
    from loom.model.hf.convert import checkpoint_model_config
    from loom.checkpoint import storage as io
    from loom.train.trainer import Trainer, build_groups

    model_cfg = checkpoint_model_config(io.read_marker(loom_dir), loom_dir)
    sp = ["parallel.sp=true"] if model_cfg.moe.num_experts else []
    cfg = load_config(None, ["parallel.tp=2", *sp, "train.steps=2", "checkpoint.save_interval=2",
                             "train.global_batch_size=2", "data.seq_len=16", "data.num_tokens=4096",
                             "optim.warmup_steps=0", "optim.lr=1e-2",
                             f"checkpoint.resume={loom_dir}", f"train.run_dir={run_dir}", "train.log_interval=100"])
    cfg.model = model_cfg
    cfg.model.attn_backend = "torch"
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    trainer.fit()
    groups.destroy()
    return os.path.join(run_dir, "checkpoints", "step_00000002")


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_train_tp2_then_export_loads_in_transformers(world2, arch, tmp_path):
    make_hf(arch, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "loom")
    ckpt = world2.run(_train_tp2, str(tmp_path / "loom"), str(tmp_path / "run"))[0]
    export_hf(ckpt, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == arch
    ours = loom.from_pretrained(ckpt, attn_backend="torch")
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    assert max_diff(logits(ours, ids), logits(hf, ids)) <= ATOL
    before, after = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "out")
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no weight"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["family"] == arch


# ----------------------------------------------------------------------------- errors


def _rewrite_weights(path, edit):
    tensors = read_safetensors(path)
    edit(tensors)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_unexpected_weights_are_named(tmp_path):
    make_hf("LlamaForCausalLM", tmp_path / "hf")
    _rewrite_weights(tmp_path / "hf", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing weight 'model.layers.1.mlp.up_proj.weight'"):
        import_hf(tmp_path / "hf", tmp_path / "loom")
    _rewrite_weights(tmp_path / "hf", lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 32),
                                                          "model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ConversionError, match=r"unexpected weight 'model.layers.0.mlp.extra.weight'"):
        import_hf(tmp_path / "hf", tmp_path / "loom")
    assert not (tmp_path / "loom").exists(), "nothing is written before the names check out"


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        import_hf(tmp_path, tmp_path / "loom")
    assert convert_cli(["import", "--hf", str(tmp_path), "--out", str(tmp_path / "loom")]) == 2


def test_incomplete_checkpoint_is_refused(tmp_path):
    make_hf("LlamaForCausalLM", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "loom")
    os.remove(tmp_path / "loom" / "checkpoint.json")
    from loom.checkpoint.storage import CheckpointError

    with pytest.raises(CheckpointError, match="incomplete: checkpoint.json is missing"):
        loom.from_pretrained(tmp_path / "loom")
    with pytest.raises(CheckpointError, match="incomplete"):
        export_hf(tmp_path / "loom", tmp_path / "out")
