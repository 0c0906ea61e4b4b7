"""Triton flash attention (interpreted on CPU) against the reference: out, lse, dq, dk, dv.

Shapes are chosen for the interpreter, which pays per block op: few heads, small head dims, and
the long documents with one head. `pytest -m "not slow"` skips the heaviest parametrizations.
"""
import pytest
import torch

from loom.kernels import reference
from tests.kernels.conftest import Case, assert_lse_close, device, max_err, reference_grads, zigzag_positions

ATOL32 = 2e-5
slow = pytest.mark.slow

CASES = {
    "long_doc_1023": dict(lens_q=[1023], hq=1, hkv=1, d=32),
    "lens_1_113_127_239_gqa2": dict(lens_q=[1, 113, 127, 239], hq=2, hkv=1, d=32),
    "many_docs_gqa4": dict(lens_q=[1, 5, 40, 3, 17, 64, 2, 9, 0, 30], hq=4, hkv=1, d=16),
    "diff_cu_seqlens": dict(lens_q=[20, 0, 50, 7, 33], lens_k=[35, 9, 50, 0, 12], hq=2, hkv=2, d=32),
    "zigzag_gqa2": dict(lens_q=[48, 30], pos_q=zigzag_positions([96, 60]), pos_k=zigzag_positions([96, 60]),
                        hq=2, hkv=1, d=32),
    "zigzag_q_vs_full_k": dict(lens_q=[30], lens_k=[60], pos_q=zigzag_positions([60]), pos_k=list(range(60)),
                               hq=2, hkv=2, d=16),
    # Keys start at position 40: the first 40 queries of the document see nothing.
    "fully_masked_rows": dict(lens_q=[70], lens_k=[50], pos_q=list(range(70)), pos_k=list(range(40, 90)),
                              hq=1, hkv=1, d=16),
    "head_dim_80": dict(lens_q=[45, 20], hq=2, hkv=1, d=80),
    "head_dim_96": dict(lens_q=[37], hq=1, hkv=1, d=96),
    "head_dim_128": dict(lens_q=[33], hq=2, hkv=2, d=128),
    "head_dim_64": dict(lens_q=[50, 14], hq=2, hkv=1, d=64),
}
PARAMS = [
    pytest.param("long_doc_1023", True, marks=slow), pytest.param("long_doc_1023", False, marks=slow),
    ("lens_1_113_127_239_gqa2", True), pytest.param("lens_1_113_127_239_gqa2", False, marks=slow),
    ("many_docs_gqa4", True), ("many_docs_gqa4", False),
    ("diff_cu_seqlens", True), ("diff_cu_seqlens", False),
    ("zigzag_gqa2", True), ("zigzag_q_vs_full_k", True), ("fully_masked_rows", True),
    ("head_dim_80", True), ("head_dim_80", False), ("head_dim_96", True), ("head_dim_128", False),
    ("head_dim_64", True),
]


def _run(fa, case, causal, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (case.q, case.k, case.v))
    out, lse = fa.flash_attn_func(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, causal=causal,
                                  pos_q=case.pos_q, pos_k=case.pos_k)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case.dout.to(dtype))
    assert out.dtype == dtype and dq.dtype == dtype and dk.shape == case.k.shape
    for t in (out, lse, dq, dk, dv):
        assert not torch.isnan(t).any()
    return out.detach(), lse, dq, dk, dv


@pytest.mark.parametrize("name,causal", PARAMS)
def test_triton_fp32_matches_reference(fa, name, causal):
    case = Case(**CASES[name])
    got = _run(fa, case, causal, torch.float32)
    want = reference_grads(case, causal)
    assert_lse_close(got[1], want[1], ATOL32)
    for i in (0, 2, 3, 4):
        assert max_err(got[i], want[i]) <= ATOL32, ("out", "lse", "dq", "dk", "dv")[i]


@pytest.mark.parametrize("name,causal", [("many_docs_gqa4", True), ("zigzag_gqa2", True), ("head_dim_80", False),
                                         pytest.param("lens_1_113_127_239_gqa2", True, marks=slow)])
def test_triton_fp16_error_within_twice_fp16_reference(fa, name, causal):
    """fp16 kernel error vs an fp32 reference <= 2x the fp16 reference's own error + 1e-5."""
    case = Case(**CASES[name], dtype=torch.float16)  # inputs rounded to fp16 once, shared by all three
    got = _run(fa, case, causal, torch.float16)
    exact = reference_grads(case, causal, dtype=torch.float32)
    half = reference_grads(case, causal, dtype=torch.float16, compute_dtype=torch.float16)
    for i in (0, 2, 3, 4):
        bound = 2 * max_err(half[i], exact[i]) + 1e-5
        assert max_err(got[i], exact[i]) <= bound, (("out", "lse", "dq", "dk", "dv")[i], bound)
    assert_lse_close(got[1], exact[1], 2 * max_err(half[1][~half[1].isinf()], exact[1][~exact[1].isinf()]) + 1e-3)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)])
@pytest.mark.parametrize("name", ["diff_cu_seqlens", "zigzag_gqa2"])
def test_triton_unequal_q_and_k_blocks(fa, monkeypatch, name, blocks):
    """GPU configs use BLOCK_M != BLOCK_N: the block tables and the causal skips must not assume equal."""
    monkeypatch.setattr(fa, "INTERPRETER_BLOCKS", blocks)
    case = Case(**CASES[name])
    got, want = _run(fa, case, True, torch.float32), reference_grads(case, True)
    for i in (0, 2, 3, 4):
        assert max_err(got[i], want[i]) <= ATOL32


def _merge(out_a, lse_a, out_b, lse_b):
    """fp32 merge of two partial softmax results: -> (out, lse); rows dead in both stay 0 / -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa, wb = torch.exp(lse_a - safe).unsqueeze(-1), torch.exp(lse_b - safe).unsqueeze(-1)
    return wa * out_a.float() + wb * out_b.float(), lse


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_ops_compose_like_ring_attention(fa, backend):
    """Two key blocks (two ring steps) merged by lse; the backward of each block, fed the MERGED
    out/lse, sums to the full gradients. Checks the block-level API of both backends."""
    from loom import kernels

    ops = kernels.block_ops(backend, device())
    lens, pos = [40, 24], zigzag_positions([80, 48])
    case = Case(lens, hq=2, hkv=1, d=16, pos_q=pos, pos_k=pos)
    halves = [[i for i, p in enumerate(pos) if (p // 8) % 2 == r] for r in (0, 1)]  # keys split in 2 blocks
    blocks = []
    for idx in halves:
        idx_t = torch.tensor(idx)
        doc_of = torch.repeat_interleave(torch.arange(2), torch.tensor(lens))[idx_t]
        cu_k = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(doc_of, minlength=2).cumsum(0)])
        blocks.append((idx_t.to(device()), cu_k.to(device(), torch.int32)))
    partial = [ops.forward(case.q, case.k[i], case.v[i], case.cu_q, cu, case.max_q, case.max_q, True, None,
                           case.pos_q, case.pos_k[i]) for i, cu in blocks]
    out, lse = _merge(*partial[0], *partial[1])
    want = reference_grads(case, True)
    assert max_err(out, want[0]) <= ATOL32
    assert_lse_close(lse, want[1], ATOL32)
    dq, dk, dv = torch.zeros_like(case.q), torch.zeros_like(case.k), torch.zeros_like(case.v)
    for i, cu in blocks:
        g = ops.backward(case.dout, case.q, case.k[i], case.v[i], out, lse, case.cu_q, cu, case.max_q, case.max_q,
                         True, None, case.pos_q, case.pos_k[i])
        dq += g[0]
        dk[i], dv[i] = g[1], g[2]
    for got, ref in zip((dq, dk, dv), want[2:]):
        assert max_err(got, ref) <= ATOL32


def test_block_table_covers_each_document_exactly(fa):
    """The real blocks first; the grid bound (40 // 16 + 4 documents) leaves two rows that exit at once."""
    from loom.kernels.block_table import block_table

    table, n = block_table(torch.tensor([0, 0, 5, 5, 40], dtype=torch.int32, device=device()), 16, 40)
    assert n == 6 and table.view(-1, 2).tolist() == [[1, 0], [3, 5], [3, 21], [3, 37], [-1, 0], [-1, 0]]
    assert block_table(torch.zeros(1, dtype=torch.int32), 16, 0)[1] == 0


def test_triton_reference_forward_api_agree(fa):
    case = Case([9, 30], hq=2, hkv=1, d=16)
    got = fa.flash_attn_forward(*case.args(), True, 0.2)
    want = reference.attention_forward(*case.args(), True, 0.2)
    assert max_err(got[0], want[0]) <= ATOL32 and max_err(got[1], want[1]) <= ATOL32


def test_block_tables_are_built_once_and_reused(fa):
    """One BlockTables over repeated forward + backward: one table per borders tensor, same results."""
    from loom.kernels.block_table import BlockTables

    case = Case([9, 30, 0, 41], hq=2, hkv=1, d=16)
    tables = BlockTables()
    results = [_run(fa, case, True, torch.float32)]
    for _ in range(2):
        q, k, v = (x.detach().clone().requires_grad_() for x in (case.q, case.k, case.v))
        out, lse = fa.flash_attn_func(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, pos_q=case.pos_q,
                                      pos_k=case.pos_k, tables=tables)
        results.append((out.detach(), lse, *torch.autograd.grad(out, (q, k, v), case.dout)))
    assert len(tables) == 2  # cu_q for the forward and dq, cu_k for dk/dv (equal blocks on CPU)
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))
