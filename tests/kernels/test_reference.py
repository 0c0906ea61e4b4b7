"""The reference twin and the torch (SDPA) backend: fast, no Triton."""
import pytest
import torch

from loom import kernels
from loom.kernels import reference
from tests.kernels.conftest import Case, assert_lse_close, max_err, reference_grads, zigzag_positions

ATOL = 1e-5

CASES = {
    "one_doc": dict(lens_q=[97]),
    "many_docs": dict(lens_q=[1, 5, 40, 3, 17, 64, 2, 9], hq=4, hkv=2),
    "equal_docs_batched": dict(lens_q=[24, 24, 24], hq=4, hkv=2),  # one batched SDPA call
    "many_short_docs": dict(lens_q=[7, 9, 12, 3, 16, 10, 20, 1] * 4, hq=4, hkv=4),
    "mixed_long_short": dict(lens_q=[150, 5, 130, 33, 9], hq=4, hkv=1),
    "empty_docs": dict(lens_q=[0, 6, 0, 11, 4], lens_k=[3, 6, 0, 0, 9], hq=2, hkv=1),
    "q_shorter_than_k": dict(lens_q=[10, 3, 20, 5], lens_k=[12, 30, 20, 2], hq=4, hkv=2),
    "q_longer_than_k_solo": dict(lens_q=[200], lens_k=[130], hq=2, hkv=2),
    "zigzag": dict(lens_q=[32, 16, 20], pos_q=zigzag_positions([64, 32, 40]),
                   pos_k=zigzag_positions([64, 32, 40]), hq=4, hkv=2),
    "zigzag_q_full_k": dict(lens_q=[32, 20], lens_k=[64, 40], pos_q=zigzag_positions([64, 40]),
                            pos_k=list(range(64)) + list(range(40)), hq=2, hkv=1),
    # Keys start at position 5: queries at positions 0..4 see nothing (fully masked rows).
    "masked_rows": dict(lens_q=[12, 140], lens_k=[8, 140], pos_q=list(range(12)) + list(range(140)),
                        pos_k=list(range(5, 13)) + list(range(5, 145)), hq=2, hkv=2),
}


def _grads(out, case, inputs):
    return torch.autograd.grad(out, inputs, case.dout)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_backend_matches_reference(name, causal):
    case = Case(**CASES[name], d=16)
    ref_out, ref_lse, *ref_grads = reference_grads(case, causal)
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    out = kernels.attention(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, causal=causal,
                            pos_q=case.pos_q, pos_k=case.pos_k, backend="torch")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert max_err(out, ref_out) <= ATOL
    for got, want in zip(_grads(out, case, (q, k, v)), ref_grads):
        assert not torch.isnan(got).any()
        assert max_err(got, want) <= ATOL
    out2, lse = kernels.attention(*case.args(), causal=causal, pos_q=case.pos_q, pos_k=case.pos_k,
                                  backend="torch", return_lse=True)
    assert max_err(out2, ref_out) <= ATOL
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert_lse_close(lse, ref_lse, ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name", ["many_docs", "empty_docs", "zigzag_q_full_k", "masked_rows"])
def test_reference_block_backward_matches_autograd(name, causal):
    """attention_forward/attention_backward (ring building blocks) equal autograd on the math."""
    case = Case(**CASES[name], d=16)
    ref_out, ref_lse, *ref_grads = reference_grads(case, causal)
    out, lse = reference.attention_forward(*case.args(), causal, None, case.pos_q, case.pos_k)
    assert max_err(out, ref_out) <= ATOL
    assert_lse_close(lse, ref_lse, ATOL)
    grads = reference.attention_backward(case.dout, *case.args()[:3], out, lse, *case.args()[3:], causal, None,
                                         case.pos_q, case.pos_k)
    for got, want in zip(grads, ref_grads):
        assert max_err(got, want) <= ATOL


def test_reference_matches_dense_softmax():
    """The per-document math equals one dense masked softmax over the whole packed batch."""
    case = Case([5, 9, 3], hq=4, hkv=2, d=8, pos_q=[0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2],
                pos_k=[0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2])
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 9, 3]))
    mask = (doc[:, None] == doc[None, :]) & (case.pos_k[None, :] <= case.pos_q[:, None])
    k, v = (x.repeat_interleave(2, dim=1) for x in (case.k, case.v))
    s = torch.einsum("qhd,khd->hqk", case.q, k) / 8 ** 0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    dense = torch.einsum("hqk,khd->qhd", p, v)
    assert max_err(reference.attention(*case.args(), pos_q=case.pos_q, pos_k=case.pos_k), dense) <= 1e-6


def test_softmax_scale_and_fp16_dtype():
    case = Case([20, 7], hq=2, hkv=2, d=16)
    ref = reference.attention(*case.args(), softmax_scale=0.3)
    out = kernels.attention(*case.args(), softmax_scale=0.3, backend="torch")
    assert max_err(out, ref) <= ATOL
    half = kernels.attention(*case.args(torch.float16), softmax_scale=0.3, backend="torch")
    assert half.dtype == torch.float16 and max_err(half, ref) <= 1e-2


def test_sdpa_zeroes_fully_masked_rows():
    """The torch backend relies on SDPA returning 0 (not NaN) for rows whose mask is all False."""
    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    out.sum().backward()
    assert torch.equal(out[0, 0, 1], torch.zeros(8)) and not torch.isnan(q.grad).any()


def test_all_documents_without_keys_give_zero_grads():
    case = Case([4, 3], lens_k=[0, 0], hq=2, hkv=1, d=8)
    q, k, v = (x.clone().requires_grad_() for x in (case.q, case.k, case.v))
    for backend in ("torch", "auto"):
        out = kernels.attention(q, k, v, case.cu_q, case.cu_k, 4, 0, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        (dq,) = torch.autograd.grad(out.sum(), (q,))
        assert torch.equal(dq, torch.zeros_like(dq))
