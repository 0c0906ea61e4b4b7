"""The single-device model: packing semantics, and logits equal to HF's for the same weights."""
import pytest
import torch

from loom.config import ModelConfig
from loom.model.batch import PackedBatch, positions_from_cu_seqlens
from loom.model.decoder import build_model

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
            attn_backend="torch")


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **kw})).eval()


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 4, 8], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]


def test_batched_equals_packed_rows():
    model = _model()
    ids = torch.randint(0, 128, (3, 10))
    batched = model(ids)
    cu = torch.tensor([0, 10, 20, 30], dtype=torch.int32)
    packed = model(PackedBatch(input_ids=ids.reshape(-1), cu_seqlens=cu, max_seqlen=10))
    assert batched.shape == (3, 10, 128)
    torch.testing.assert_close(packed.view(3, 10, -1), batched, atol=1e-6, rtol=0)


def test_documents_do_not_see_each_other():
    """Changing one packed document leaves every other document's logits unchanged."""
    model = _model()
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    ids = torch.randint(0, 128, (17,))
    base = model(PackedBatch(input_ids=ids, cu_seqlens=cu))
    changed = ids.clone()
    changed[:5] = (changed[:5] + 7) % 128
    out = model(PackedBatch(input_ids=changed, cu_seqlens=cu))
    torch.testing.assert_close(out[5:], base[5:], atol=0, rtol=0)
    assert (out[:5] - base[:5]).abs().max() > 1e-3
    alone = model(ids[6:17])  # a document is the same wherever it sits in the pack
    torch.testing.assert_close(base[6:17], alone, atol=1e-5, rtol=0)


def test_packed_batch_takes_ids_or_hidden_states_never_both():
    with pytest.raises(ValueError, match="exactly one"):
        PackedBatch()
    with pytest.raises(ValueError, match="exactly one"):
        PackedBatch(input_ids=torch.zeros(2, dtype=torch.long), hidden=torch.zeros(2, 32))


def test_hidden_states_are_what_the_head_reads():
    model = _model()
    batch = PackedBatch.from_ids(torch.randint(0, 128, (2, 6)))
    hidden = model.hidden_states(batch)
    assert hidden.shape == (12, 32)
    torch.testing.assert_close(model.lm_head(hidden), model.logits(batch), atol=0, rtol=0)


def test_tied_embeddings_share_the_parameter():
    model = _model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1


HF_CASES = {
    "LlamaForCausalLM": {},
    "Qwen2ForCausalLM": {},
    "Qwen3ForCausalLM": {"head_dim": 16, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("arch", sorted(HF_CASES))
def test_logits_match_hf(arch):
    transformers = pytest.importorskip("transformers")
    from loom.model.hf import load_hf_state_dict, model_config_from_hf

    hf_cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64, **HF_CASES[arch])
    hf_cfg.architectures = [arch]
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(hf_cfg).eval()
    cfg = model_config_from_hf(hf_cfg.to_dict())
    cfg.attn_backend = "torch"
    loom = build_model(cfg).eval()
    load_hf_state_dict(loom, hf.state_dict())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        diff = (loom(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{arch}: max |Loom - HF| = {diff:.2e}"
