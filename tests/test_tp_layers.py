"""Collectives and tensor-parallel layers on 2 ranks against their unsharded math."""
import pytest
import torch

TP = 2


def _setup():
    import torch.distributed as dist

    torch.manual_seed(0)
    return dist.group.WORLD, dist.get_rank()


def _comm_pairs():
    """Each Function's forward and backward against the plain tensor algebra they stand for."""
    from loom.parallel import comm
    from loom.parallel.cp_plan import CommStats

    group, rank = _setup()
    full = torch.randn(8, 6)  # identical on both ranks (same seed)
    grad = torch.randn(8, 6)
    mine = full.chunk(TP, 0)[rank]
    checks = {}

    def run(fn, x, g):
        x = x.clone().requires_grad_(True)
        y = fn(x)
        y.backward(g)
        return y.detach(), x.grad

    y, gx = run(lambda x: comm.gather(x, group, 0, reduce_grad=True), mine, grad * (rank + 1))
    checks["gather_seq"] = (torch.equal(y, full), torch.allclose(gx, (3 * grad).chunk(TP, 0)[rank]))
    y, gx = run(lambda x: comm.gather(x, group, 0), mine, grad)
    checks["gather_seq_replicated_consumer"] = (torch.equal(y, full), torch.equal(gx, grad.chunk(TP, 0)[rank]))
    y, gx = run(lambda x: comm.reduce_scatter_to_sequence(x, group), full * (rank + 1), grad.chunk(TP, 0)[rank])
    checks["reduce_scatter_seq"] = (torch.allclose(y, (3 * full).chunk(TP, 0)[rank]), torch.allclose(gx, grad))
    y, gx = run(lambda x: comm.scatter(x, group, 0), full, grad.chunk(TP, 0)[rank])
    checks["scatter_seq"] = (torch.equal(y, mine), torch.equal(gx, grad))
    y, gx = run(lambda x: comm.copy_to_region(x, group), full, grad * (rank + 1))
    checks["copy"] = (torch.equal(y, full), torch.allclose(gx, 3 * grad))
    y, gx = run(lambda x: comm.reduce_from_region(x, group), full * (rank + 1), grad)
    checks["reduce"] = (torch.allclose(y, 3 * full), torch.equal(gx, grad))
    y, gx = run(lambda x: comm.gather(x, group, -1), full.chunk(TP, -1)[rank], grad)
    checks["gather_last"] = (torch.equal(y, full), torch.equal(gx, grad.chunk(TP, -1)[rank]))
    y, gx = run(lambda x: comm.scatter(x, group, -1), full, grad.chunk(TP, -1)[rank])
    checks["scatter_last"] = (torch.equal(y, full.chunk(TP, -1)[rank]), torch.equal(gx, grad))

    # The all-to-alls move rows without arithmetic, so a gradient of 2 * y must come back as 2 * x.
    counts = [[1, 3], [2, 2]]  # rows that rank i sends to rank j
    sent = [full[4 * i:4 * (i + 1)].split(counts[i]) for i in range(TP)]
    received = torch.cat([sent[i][rank] for i in range(TP)])
    rows = full[4 * rank:4 * (rank + 1)]
    y, gx = run(lambda x: comm.all_to_all(x, group, [c[rank] for c in counts], counts[rank]), rows, 2 * received)
    checks["all_to_all"] = (torch.equal(y, received), torch.equal(gx, 2 * rows))
    tokens = torch.randn(8, 4, 3)  # [T, H, D]
    own_tokens, own_heads = tokens.chunk(TP, 0)[rank], tokens.chunk(TP, 1)[rank]
    stats = CommStats()
    y, gx = run(lambda x: comm.seq_to_heads(x, group, stats), own_tokens, 2 * own_heads)
    sent_bytes = own_tokens.numel() * own_tokens.element_size() * (TP - 1) // TP  # the block a rank keeps is not sent
    counted = stats.bytes == {"ulysses_fwd": sent_bytes, "ulysses_bwd": sent_bytes}
    checks["seq_to_heads"] = (torch.equal(y, own_heads) and counted, torch.equal(gx, 2 * own_tokens))
    y, gx = run(lambda x: comm.heads_to_seq(x, group), own_heads, 2 * own_tokens)
    checks["heads_to_seq"] = (torch.equal(y, own_tokens), torch.equal(gx, 2 * own_heads))
    perm = torch.randperm(8)
    index = perm.chunk(TP)[rank]
    y, gx = run(lambda x: comm.gather_from_context(x, group, index, torch.argsort(perm)), full[index], grad)
    checks["gather_from_context"] = (torch.equal(y, full), torch.equal(gx, grad[index]))
    return checks


def _fused_head_loss(sp):
    """lm_head_loss through a vocabulary-split head against F.cross_entropy on the full logits."""
    import torch.nn as nn
    import torch.nn.functional as F

    from loom.parallel import comm
    from loom.parallel.tensor_parallel import ColumnParallelLinear
    from loom.train.loss import lm_head_loss

    group, rank = _setup()
    head = nn.Linear(8, 16, bias=False)
    hidden, labels = torch.randn(10, 8), torch.randint(0, 16, (10,))
    labels[[0, 3]] = -100
    ref_h = hidden.clone().requires_grad_(True)
    ref = F.cross_entropy(head(ref_h), labels, ignore_index=-100, reduction="sum")
    (ref * 0.5).backward()
    p_head = ColumnParallelLinear.from_linear(head, group, input_mode="gather" if sp else "copy")
    x = (comm.split(hidden, group, 0) if sp else hidden).clone().requires_grad_(True)
    loss = lm_head_loss(p_head, x, labels, chunk_rows=3)  # 8 loss rows: chunks of 3, 3 and 2
    (loss * 0.5).backward()
    expected_gx = comm.split(ref_h.grad, group, 0) if sp else ref_h.grad
    return {"loss": (loss - ref).abs().item(), "hidden": (x.grad - expected_gx).abs().max().item(),
            "weight": (p_head.weight.grad - head.weight.grad.chunk(TP, 0)[rank]).abs().max().item()}


def _mlp_and_embedding(sp):
    """Embedding -> column -> row, sharded vs dense: outputs and every gradient."""
    import torch.nn as nn

    from loom.parallel import comm
    from loom.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    group, rank = _setup()
    emb, up, down = nn.Embedding(16, 8), nn.Linear(8, 12, bias=True), nn.Linear(12, 8, bias=True)
    ids = torch.randint(0, 16, (6,))
    ref = down(torch.relu(up(emb(ids))))
    ref.pow(2).sum().backward()
    p_emb = VocabParallelEmbedding.from_embedding(emb, group, sequence_parallel=sp)
    p_up = ColumnParallelLinear.from_linear(up, group, input_mode="gather" if sp else "copy")
    p_down = RowParallelLinear.from_linear(down, group, sequence_parallel=sp)
    out = p_down(torch.relu(p_up(p_emb(ids))))
    out.pow(2).sum().backward()
    expected = comm.split(ref.detach(), group, 0) if sp else ref.detach()
    bias_grad = comm.all_reduce(p_down.bias.grad, group) if sp else p_down.bias.grad
    errs = {
        "out": (out - expected).abs().max().item(),
        "emb": (p_emb.weight.grad - emb.weight.grad.chunk(TP, 0)[rank]).abs().max().item(),
        "up_w": (p_up.weight.grad - up.weight.grad.chunk(TP, 0)[rank]).abs().max().item(),
        "up_b": (p_up.bias.grad - up.bias.grad.chunk(TP, 0)[rank]).abs().max().item(),
        "down_w": (p_down.weight.grad - down.weight.grad.chunk(TP, 1)[rank]).abs().max().item(),
        "down_b": (bias_grad - down.bias.grad).abs().max().item(),
    }
    return errs


def test_comm_functions_mirror_each_other(world2):
    for rank, checks in enumerate(world2.run(_comm_pairs)):
        for name, (fwd_ok, bwd_ok) in checks.items():
            assert fwd_ok, f"rank {rank}: {name} forward"
            assert bwd_ok, f"rank {rank}: {name} backward"


@pytest.mark.parametrize("sp", [False, True])
def test_fused_lm_head_loss_with_split_vocabulary_matches_full(world2, sp):
    for errs in world2.run(_fused_head_loss, sp):
        assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("sp", [False, True])
def test_parallel_layers_match_dense(world2, sp):
    for errs in world2.run(_mlp_and_embedding, sp):
        for name, err in errs.items():
            assert err < 1e-5, f"{name}: {err:.2e}"
