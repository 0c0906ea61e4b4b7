"""The backward split into B (input gradients) and W (weight gradients) equals the whole backward."""
import pytest
import torch

from loom.config import ModelConfig
from loom.model.batch import PackedBatch
from loom.model.decoder import build_model
from loom.model.recompute import apply_recompute
from loom.parallel.pipeline import split_stages
from loom.parallel.split_backward import SplitBackward
from loom.train.loss import lm_head_loss

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
            attn_backend="torch")


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def _two_stages(recompute: str, **extra):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, **extra))
    stages = [split_stages(model, rank, 2)[0] for rank in range(2)]
    if recompute != "none":
        apply_recompute(stages, recompute, None)
    ids, labels = torch.randint(0, 64, (24,)), torch.randint(0, 64, (24,))
    return model, stages, PackedBatch(input_ids=ids), labels


@pytest.mark.parametrize("recompute, bias", [("none", False), ("full", False), ("none", True)])
def test_split_equals_whole_backward_on_loom_stages(recompute, bias):
    """Both stages of a PP2 split of the decoder, the last with the fused LM head loss (a custom
    Function that B and W both run): same input gradient, same weight gradients, and no weight
    gradient (nor bucket hook) before W. With attention biases a weight and its bias share a node,
    so their groups merge."""
    model, (first, last), batch, labels = _two_stages(recompute, attention_bias=bias)
    params = list(model.parameters())

    def forward():
        hidden = first.hidden_states(batch)
        x = hidden.detach().requires_grad_()
        loss = lm_head_loss(last.lm_head, last.hidden_states(batch.with_hidden(x)), labels) / 7.0
        return hidden, x, loss

    hidden, x, loss = forward()
    loss.backward()
    hidden.backward(x.grad)
    expected_dx, expected = x.grad.clone(), _grads(params)
    for p in params:
        p.grad = None

    hooked = []
    hooks = [p.register_post_accumulate_grad_hook(hooked.append) for p in params]
    hidden, x, loss = forward()
    split = SplitBackward([loss], [None], x)
    assert all(p.grad is None for p in params) and not hooked, "B accumulated weight gradients"
    torch.testing.assert_close(split.input_grad, expected_dx, rtol=0, atol=0)
    split.weights()
    assert all(p.grad is None for p in first.parameters()), "W of the last stage reached the first"
    SplitBackward([hidden], [split.input_grad], None).weights()  # the first stage: W is the whole backward
    for hook in hooks:
        hook.remove()
    for p, got, want in zip(params, _grads(params), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert sorted(map(id, hooked)) == sorted(map(id, params)), "each parameter's hook fires exactly once"


def test_weights_used_twice_and_objectives_without_the_input():
    """A weight applied at two depths has two frontier nodes, one downstream of the other in W's
    walk (its recorded gradient must not be added to again); an auxiliary objective of the
    weights alone never reaches B and is W's own root."""
    torch.manual_seed(0)
    w, u = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    x0 = torch.randn(3, 4)

    def forward(x):
        h = torch.tanh(x @ w)
        out = torch.tanh(h @ w) @ u
        aux = 0.1 * (u * u).sum() + 0.01 * (w ** 3).sum()
        return out, aux

    x = x0.clone().requires_grad_()
    out, aux = forward(x)
    g = torch.randn_like(out)
    torch.autograd.backward([out, aux], [g, None])
    expected = [x.grad.clone(), w.grad.clone(), u.grad.clone()]
    w.grad = u.grad = None

    x = x0.clone().requires_grad_()
    out, aux = forward(x)
    split = SplitBackward([out, aux], [g, None], x)
    assert w.grad is None and u.grad is None
    split.weights()
    for got, want in zip([split.input_grad, w.grad, u.grad], expected):
        torch.testing.assert_close(got, want)


def test_weights_sharing_a_node_count_a_shared_objective_once():
    """Two weights meeting before the input's path form one W group; an objective of both alone
    is a root each of them reaches, and its gradient must enter that group once."""
    torch.manual_seed(0)
    p1, p2 = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    x0 = torch.randn(3, 4)

    def forward(x):
        return (x @ (p1 + p2)).tanh(), (p1 * p2).sum()

    x = x0.clone().requires_grad_()
    out, aux = forward(x)
    g = torch.randn_like(out)
    torch.autograd.backward([out, aux], [g, None])
    expected = [x.grad.clone(), p1.grad.clone(), p2.grad.clone()]
    p1.grad = p2.grad = None

    x = x0.clone().requires_grad_()
    split = SplitBackward(list(forward(x)), [g, None], x)
    split.weights()
    for got, want in zip([split.input_grad, p1.grad, p2.grad], expected):
        torch.testing.assert_close(got, want)


def test_an_input_the_output_ignores_gets_a_zero_gradient():
    w = torch.randn(2, 2, requires_grad=True)
    x = torch.randn(2, 2, requires_grad=True)
    split = SplitBackward([(w * 2).sum()], [None], x)
    assert torch.equal(split.input_grad, torch.zeros_like(x)) and w.grad is None
    split.weights()
    torch.testing.assert_close(w.grad, torch.full_like(w, 2.0))
