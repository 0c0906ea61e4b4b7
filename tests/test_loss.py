"""The fused LM head + cross-entropy against its plain twin, F.cross_entropy on the full logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from loom.train.loss import default_chunk_rows, linear_cross_entropy


def _reference_from_logits(logits, labels):
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")


def _reference(hidden, weight, labels):
    return _reference_from_logits(hidden @ weight.t(), labels)


def _grads(fn, hidden, weight, labels, scale=1.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _case(tokens, vocab=37, hidden=16, ignored=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[list(ignored)] = -100
    return h, w, y


@pytest.mark.parametrize("tokens,chunk,ignored", [
    (1, None, ()),                  # a single token
    (13, 5, ()),                    # the last chunk is short
    (13, 1, (0, 4, 12)),            # one row per chunk, ignored rows at both ends
    (13, 64, (2, 3, 7)),            # one chunk larger than the input
    (40, 8, tuple(range(0, 40, 2))),
])
def test_matches_cross_entropy_forward_and_backward(tokens, chunk, ignored):
    h, w, y = _case(tokens, ignored=ignored)
    fused = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=chunk), h, w, y, scale=0.37)
    ref = _grads(_reference, h, w, y, scale=0.37)
    for got, want, name in zip(fused, ref, ("loss", "d hidden", "d weight")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    if ignored:  # ignored rows get exactly zero gradient
        assert fused[1][list(ignored)].abs().max() == 0


def test_every_label_ignored_gives_zero_loss_and_gradients():
    h, w, y = _case(6, ignored=range(6))
    loss, gh, gw = _grads(linear_cross_entropy, h, w, y)
    assert loss == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


def test_batched_shape_and_frozen_weight():
    h, w, y = _case(12)
    hb = h.view(3, 4, -1).clone().requires_grad_()
    loss = linear_cross_entropy(hb, w, y.view(3, 4))  # w does not require grad: no d weight computed
    loss.backward()
    ref_h = h.clone().requires_grad_()
    _reference(ref_h, w, y).backward()
    torch.testing.assert_close(hb.grad.view(12, -1), ref_h.grad, rtol=1e-5, atol=1e-6)


def test_tied_weight_accumulates_with_embedding_gradient():
    """A weight shared with an embedding gets both gradients, as with the unfused head."""
    h, w, y = _case(9)
    grads = []
    for fn in (linear_cross_entropy, _reference):
        weight = w.clone().requires_grad_()
        hidden = F.embedding(y.clamp(min=0), weight) + h
        fn(hidden, weight, y).backward()
        grads.append(weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bf16_compute_matches_autocast_reference():
    h, w, y = _case(20, vocab=50, hidden=32, ignored=(3,))
    fused = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, compute_dtype=torch.bfloat16, chunk_rows=7),
                   h, w, y)

    def ref(a, b, c):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = a @ b.t()
        return _reference_from_logits(logits, c)

    want = _grads(ref, h, w, y)
    assert fused[1].dtype == fused[2].dtype == torch.float32
    for got, exp in zip(fused, want):
        torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm_, torch.ops.aten.addmm)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad", [True, False])
def test_gradient_gemms_run_only_when_gradients_are_wanted(grad):
    """3 chunks: one GEMM each for the logits, two more each for d hidden and d weight."""
    h, w, y = _case(9)
    h.requires_grad_()
    w.requires_grad_()
    with torch.set_grad_enabled(grad), _CountMatmuls() as counter:
        loss = linear_cross_entropy(h, w, y, chunk_rows=3)
    assert counter.count == (9 if grad else 3)
    assert loss.requires_grad == grad
    torch.testing.assert_close(loss.detach(), _reference(h.detach(), w.detach(), y))


def test_bad_shapes_and_labels_name_the_mismatch():
    h, w, y = _case(8)
    y[2] = w.shape[0]
    with pytest.raises(ValueError, match=r"labels \[37\] lie outside the vocabulary \[0, 37\)"):
        linear_cross_entropy(h, w, y)
    y[2] = 0
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(h[:, :7], w, y)


def test_default_chunk_bounds_the_logits_alive_at_once():
    assert default_chunk_rows(8192) == 512
    assert default_chunk_rows(151_936) == 256  # large vocabularies keep GEMMs at least this tall
