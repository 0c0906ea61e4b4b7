"""Kernel tests run the Triton kernels through the interpreter on CPU tensors (natively on a GPU).

TRITON_INTERPRET is read when ``@triton.jit`` decorates a function: triton.language's own helpers
(tl.max, tl.sum, ...) when triton is first imported, ours when loom.kernels.flash_attn is (kernels/__init__
imports it lazily). So it is set here, before this directory's tests import anything. If triton was
imported earlier in this process without it, triton cannot be re-imported: the Triton tests then fail
with a message saying so, and the variable must be set earlier (e.g. at the top of tests/conftest.py).
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def fa():
    """The loom.kernels.flash_attn module, runnable here (interpreted on CPU)."""
    mod = importlib.import_module("loom.kernels.flash_attn")
    if not torch.cuda.is_available():
        assert mod.INTERPRETED and mod.STDLIB_INTERPRETED, (
            "triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports triton "
            "(e.g. at the top of tests/conftest.py)")
    return mod


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cu_seqlens(lens):
    """[len(lens) + 1] int32 prefix sums from 0."""
    return torch.tensor([0] + list(lens), device=device()).cumsum(0).to(torch.int32)


def zigzag_positions(lens, chunks=4, keep=(0, 3)):
    """Positions of a zigzag CP shard: each document cut in `chunks` pieces, keeping pieces `keep`."""
    out = []
    for n in lens:
        bounds = [n * i // chunks for i in range(chunks + 1)]
        out += [p for c in keep for p in range(bounds[c], bounds[c + 1])]
    return out


class Case:
    """A packed batch: q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens, optional positions (int32)."""

    def __init__(self, lens_q, lens_k=None, hq=2, hkv=1, d=32, *, pos_q=None, pos_k=None, seed=0,
                 dtype=torch.float32):
        lens_k = lens_q if lens_k is None else lens_k
        g = torch.Generator().manual_seed(seed)
        tq, tk = sum(lens_q), sum(lens_k)
        self.q = torch.randn(tq, hq, d, generator=g).to(device(), dtype)
        self.k = torch.randn(tk, hkv, d, generator=g).to(device(), dtype)
        self.v = torch.randn(tk, hkv, d, generator=g).to(device(), dtype)
        self.dout = torch.randn(tq, hq, d, generator=g).to(device(), dtype)
        self.cu_q, self.cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
        self.max_q, self.max_k = max(lens_q, default=0), max(lens_k, default=0)
        self.pos_q = None if pos_q is None else torch.tensor(pos_q, dtype=torch.int32, device=device())
        self.pos_k = None if pos_k is None else torch.tensor(pos_k, dtype=torch.int32, device=device())

    def args(self, dtype=None):
        cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
        return (cast(self.q), cast(self.k), cast(self.v), self.cu_q, self.cu_k, self.max_q, self.max_k)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def reference_grads(case, causal, dtype=torch.float32, compute_dtype=torch.float32, scale=None):
    """Reference (out, lse, dq, dk, dv) by autograd on the explicit math."""
    from loom.kernels import reference

    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (case.q, case.k, case.v))
    out, lse = reference.attention(q, k, v, case.cu_q, case.cu_k, case.max_q, case.max_k, causal=causal,
                                   softmax_scale=scale, pos_q=case.pos_q, pos_k=case.pos_k, return_lse=True,
                                   compute_dtype=compute_dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), case.dout.to(dtype))
    return out.detach(), lse, dq, dk, dv


def assert_lse_close(lse, ref, atol):
    """lse: the same rows are -inf (no key seen), the others agree within atol; never NaN."""
    assert not torch.isnan(lse).any()
    dead = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), dead)
    assert max_err(lse[~dead], ref[~dead]) <= atol
