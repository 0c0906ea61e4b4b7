"""The public dispatch API: backends agree, errors are clear."""
import pytest
import torch

from loom import kernels
from tests.kernels.conftest import Case, max_err, zigzag_positions


def _out_and_grads(case, backend, causal):
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    out, lse = kernels.attention(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, causal=causal,
                                 pos_q=case.pos_q, pos_k=case.pos_k, backend=backend, return_lse=True)
    assert not lse.requires_grad  # documented: no gradient through lse
    plain = kernels.attention(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, causal=causal,
                              pos_q=case.pos_q, pos_k=case.pos_k, backend=backend)
    assert torch.equal(plain, out) or max_err(plain, out) <= 1e-6
    return (out, lse, *torch.autograd.grad(plain, (q, k, v), case.dout))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("kind", ["default_positions", "zigzag_positions", "empty_docs"])
def test_torch_and_triton_backends_agree(fa, kind, causal):
    if kind == "default_positions":
        case = Case([3, 41, 17], hq=4, hkv=2, d=16)
    elif kind == "zigzag_positions":
        pos = zigzag_positions([48, 24])
        case = Case([24, 12], hq=2, hkv=1, d=16, pos_q=pos, pos_k=pos)
    else:
        case = Case([0, 12, 9, 0], lens_k=[5, 12, 0, 0], hq=2, hkv=2, d=16)
    torch_res = _out_and_grads(case, "torch", causal)
    triton_res = _out_and_grads(case, "triton", causal)
    for a, b in zip(torch_res, triton_res):
        finite = ~torch.isneginf(a)
        assert torch.equal(finite, ~torch.isneginf(b))
        assert max_err(a[finite], b[finite]) <= 2e-5


@pytest.mark.skipif(kernels.flash_attn_available(), reason="flash-attn is installed here")
def test_flash_attn_backend_without_package_is_a_clear_error():
    case = Case([8], hq=2, hkv=2, d=16)
    with pytest.raises(RuntimeError, match="flash-attn is not installed"):
        kernels.attention(*case.args(), backend="flash_attn")


def test_unknown_backend_names_the_valid_ones():
    case = Case([8], hq=2, hkv=2, d=16)
    with pytest.raises(ValueError, match="valid values are auto, triton, flash_attn, torch"):
        kernels.attention(*case.args(), backend="cudnn")


def test_auto_picks_triton_on_cuda_and_torch_elsewhere():
    assert kernels.resolve_backend("auto", "cuda") == "triton"
    assert kernels.resolve_backend("auto", "cpu") == "torch"
    assert kernels.resolve_backend("torch", "cuda") == "torch"


def test_block_ops_pairs():
    from loom.kernels import reference

    assert kernels.block_ops("torch") == (reference.attention_forward, reference.attention_backward)
    assert kernels.block_ops("auto", "cpu").forward is reference.attention_forward
    with pytest.raises(ValueError, match="flash_attn"):
        kernels.block_ops("flash_attn", "cuda")


def test_bad_shapes_are_rejected():
    case = Case([8], hq=3, hkv=2, d=16)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        kernels.attention(*case.args(), backend="torch")
    case = Case([8], hq=2, hkv=2, d=16)
    with pytest.raises(ValueError, match="same number of documents"):
        kernels.attention(case.q, case.k, case.v, case.cu_q, torch.tensor([0, 4, 8], dtype=torch.int32), 8, 4,
                          backend="torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_on_cpu_needs_the_interpreter_and_no_bf16(fa, monkeypatch):
    case = Case([8], hq=2, hkv=2, d=16)
    with pytest.raises(RuntimeError, match="bf16"):
        kernels.attention(*case.args(torch.bfloat16), backend="triton")
    monkeypatch.setattr(fa, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(*case.args(), backend="triton")
