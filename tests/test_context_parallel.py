"""Context parallelism: zigzag plan (host), ring / Ulysses attention vs full attention, full-model
parity against world size 1, no attention across document borders, and bytes on the wire."""
import math
import os

import numpy as np
import pytest
import torch

from loom.config import ConfigError, load_config
from loom.parallel.cp_plan import ZigzagPlan, zigzag_chunk_sizes
from tests.parity import ROOT, assert_parity, params, train_layout

CONFIG = "launch/configs/tiny_dense.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_cp_parity", "model.attn_backend=torch"]
ATOL = 1e-5


def doc_lengths(total: int, seed: int) -> list[int]:
    """Random packed documents: lengths 1, 2 and 3, one longer than all others, the rest 1..12."""
    rng = np.random.default_rng(seed)
    lens = [1, 2, 3, total // 3 + 1]
    while sum(lens) < total:
        lens.append(int(min(total - sum(lens), rng.integers(1, 13))))
    rng.shuffle(lens)
    return lens


def cu_of(lens) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


# ----------------------------------------------------------------------------- the plan (host only)


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_zigzag_plan_shards_every_document_evenly(cp):
    lens = doc_lengths(32 * cp, seed=cp) + [1] * (2 * cp)
    plan = ZigzagPlan(cu_of(lens), cp)
    sizes = zigzag_chunk_sizes(np.array(lens), cp)
    assert (sizes.sum(1) == lens).all() and (sizes.max(1) - sizes.min(1) <= 1).all()
    assert (sizes.sum(0) == plan.total // (2 * cp)).all()  # equal slots although no doc is padded
    seen = torch.cat([plan.index(r) for r in range(cp)])
    assert torch.equal(seen.sort().values, torch.arange(plan.total))
    full_pos = torch.cat([torch.arange(n) for n in lens]).int()
    for r in range(cp):
        assert plan.index(r).numel() == plan.total // cp
        assert plan.cu_seqlens(r).numel() == len(lens) + 1
        assert torch.equal(plan.positions(r), full_pos[plan.index(r)])
        local_lens = plan.cu_seqlens(r).diff()
        assert plan.max_seqlen(r) == int(local_lens.max())
        # Local order: document by document, chunk r then chunk 2cp-1-r, so positions rise in a doc.
        for d, (s, e) in enumerate(zip(plan.cu_seqlens(r)[:-1].tolist(), plan.cu_seqlens(r)[1:].tolist())):
            assert e - s == sizes[d, r] + sizes[d, 2 * cp - 1 - r]
            assert bool((plan.positions(r)[s:e].diff() > 0).all())


def test_shard_then_unshard_is_identity():
    plan = ZigzagPlan(cu_of(doc_lengths(96, seed=3)), 4)
    x = torch.randn(96, 3)
    gathered = torch.cat([plan.shard(x, r) for r in range(4)])  # what an all-gather returns
    order, inverse = plan.gathered_index()
    assert torch.equal(gathered[inverse], x) and torch.equal(x[order], gathered)


def test_labels_stay_aligned_across_chunk_borders():
    """A shard keeps each token's own next-token label, also where that next token lives on another rank."""
    from loom.data import PackedDataset, collate, synthetic_corpus

    corpus = synthetic_corpus(256, 4096, seed=0, min_doc_len=1, max_doc_len=40)
    data = PackedDataset(corpus, 64)
    mb = collate([data[i] for i in range(4)])  # windows 0..3: tokens 0..255 of the stream
    stream = torch.from_numpy(corpus.tokens[:257].astype(np.int64))
    cp = 4
    plan = ZigzagPlan(mb.cu_seqlens, cp)
    owner = torch.empty(plan.total, dtype=torch.long)
    for r in range(cp):
        owner[plan.index(r)] = r
    crossing = 0
    for r in range(cp):
        idx = plan.index(r)
        labels = plan.shard(mb.labels, r)
        assert torch.equal(labels, mb.labels[idx])
        has = labels != -100
        nxt = idx[has] + 1
        assert torch.equal(labels[has], stream[nxt])  # the true next token of the document
        crossing += int((owner[nxt[nxt < plan.total]] != r).sum())
    assert crossing > 0  # chunk borders inside documents were exercised


def _visible_pairs(plan, r, s, causal):
    """Brute force: (local q row, local k row) pairs of the same document that attention may use."""
    dq = torch.repeat_interleave(torch.arange(plan.cu_seqlens(r).numel() - 1), plan.cu_seqlens(r).diff())
    dk = torch.repeat_interleave(torch.arange(plan.cu_seqlens(s).numel() - 1), plan.cu_seqlens(s).diff())
    ok = dq[:, None] == dk[None, :]
    if causal:
        ok &= plan.positions(s)[None, :] <= plan.positions(r)[:, None]
    return ok


@pytest.mark.parametrize("lens, some_skipped", [(doc_lengths(64, seed=5), False), ([1] * 32 + [2] * 16, True),
                                                ([3] * 20 + [1] * 4, False)])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_blocks_drop_only_invisible_pairs(lens, some_skipped, causal):
    """Each ring step computes a sub-block; every visible pair lies inside it, and skipped blocks have none."""
    cp = 4
    plan = ZigzagPlan(cu_of(lens), cp)
    skipped = 0
    for r in range(cp):
        for s, blk in enumerate(plan.blocks(r, causal)):
            ok = _visible_pairs(plan, r, s, causal)
            rows = torch.zeros(ok.shape[0], dtype=torch.bool)
            cols = torch.zeros(ok.shape[1], dtype=torch.bool)
            rows[blk.q_index if blk.q_index is not None else slice(None)] = True
            cols[blk.k_index if blk.k_index is not None else slice(None)] = True
            assert not (ok & ~(rows[:, None] & cols[None, :])).any(), (r, s)
            assert blk.visible == bool(ok.any()), (r, s)
            skipped += not blk.visible
    if some_skipped:
        assert skipped > 0


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, world, match", [
    (["parallel.cp=4", "data.seq_len=36"], 4, r"data.seq_len=36 is not divisible by 2\*parallel.cp=8"),
    (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "data.seq_len=36"], 4,
     r"data.seq_len=36 is not divisible by 2\*parallel.cp\*parallel.tp=8"),
    (["parallel.cp=4", "parallel.tp=2", "parallel.cp_mode=ulysses"], 8,
     r"parallel.cp_mode=ulysses needs model.num_heads/parallel.tp = 4/2 = 2 .* parallel.cp=4"),
    (["parallel.cp_mode=zigzag"], 1, r"parallel.cp_mode='zigzag' must be ring or ulysses"),
    (["parallel.cp=2", "model.attn_backend=flash_attn"], 2, r"parallel.cp_mode=ring .* model.attn_backend"),
])
def test_config_rejects_bad_cp_layouts(overrides, world, match):
    cfg = load_config(os.path.join(ROOT, CONFIG), overrides)
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world)


def test_config_accepts_cp_layouts():
    for overrides, world in ((["parallel.cp=2"], 2), (["parallel.cp=4", "parallel.cp_mode=ulysses"], 4),
                             (["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"], 4)):
        cfg = load_config(os.path.join(ROOT, CONFIG), overrides)
        cfg.validate(world)  # raises ConfigError if the layout is refused
        assert cfg.dp_size(world) == 1


# ----------------------------------------------------------------------------- attention vs full attention

CASES = {  # name: (doc lengths, Hq, Hkv, causal)
    "gqa_causal": (doc_lengths(96, seed=11), 4, 2, True),
    "mqa_causal": (doc_lengths(96, seed=12), 4, 1, True),  # Ulysses replicates the kv head
    "bidirectional": (doc_lengths(96, seed=13), 4, 4, False),
    "tiny_docs": ([1] * 24 + [2] * 8 + [3] * 8, 4, 2, True),  # most ring blocks see nothing
}
HEAD_DIM = 8


class _CountingOps:
    """block_ops that count their calls, to prove that invisible blocks are skipped."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {"forward": 0, "backward": 0}

    def forward(self, *args, **kwargs):
        self.calls["forward"] += 1
        return self.ops.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls["backward"] += 1
        return self.ops.backward(*args, **kwargs)


def _attention_case(mode, name, backend="torch"):
    if backend == "triton" and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (this worker: now)
    import torch.distributed as dist

    from loom import kernels
    from loom.model.layers import PackedMeta
    from loom.parallel.context_parallel import ContextParallelAttention, CPShard
    from loom.parallel.cp_plan import CommStats
    from loom.parallel.ring_attention import ring_attention

    lens, hq, hkv, causal = CASES[name]
    group, cp, r = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)  # the same full batch on every rank
    total, cu = sum(lens), cu_of(lens)
    q, k, v = (torch.randn(total, h, HEAD_DIM, requires_grad=True) for h in (hq, hkv, hkv))
    dout = torch.randn(total, hq, HEAD_DIM)
    ref = kernels.attention(q, k, v, cu, cu, max(lens), max(lens), causal=causal, backend="torch")
    ref.backward(dout)
    plan = ZigzagPlan(cu, cp)
    local = [plan.shard(x.detach(), r).requires_grad_() for x in (q, k, v)]
    stats, counted = CommStats(), None
    if mode == "ring":
        counted = _CountingOps(kernels.block_ops(backend, "cpu"))
        out = ring_attention(*local, plan.blocks(r, causal), group, counted, stats=stats)
    else:
        meta = PackedMeta(plan.cu_seqlens(r), plan.max_seqlen(r), None, None, CPShard(plan=plan, rank=r))
        out = ContextParallelAttention("torch", causal, group, mode, stats)(*local, meta)
    out.backward(plan.shard(dout, r))
    errors = {"out": (out - plan.shard(ref.detach(), r)).abs().max().item()}
    for n, mine, full in zip("qkv", local, (q, k, v)):
        errors["d" + n] = (mine.grad - plan.shard(full.grad, r)).abs().max().item()
    visible = sum(b.visible for b in plan.blocks(r, causal))
    return {"errors": errors, "bytes": dict(stats.bytes), "calls": counted and counted.calls,
            "visible": visible, "local": (total // cp, hq, hkv)}


def _ring_comm_refuses_misuse():
    import torch.distributed as dist

    from loom.parallel.ring_attention import RingComm

    ring, errors = RingComm(dist.group.WORLD), []
    for action in (ring.wait, ring.commit):
        try:
            action()
        except RuntimeError as e:
            errors.append(str(e))
    buf = ring.send_recv(torch.full((3,), float(dist.get_rank())))
    ring.commit()
    try:
        ring.send_recv(torch.zeros(3))
    except RuntimeError as e:
        errors.append(str(e))
    ring.wait()
    return errors, buf.tolist()


@pytest.fixture(scope="module")
def attention_results(world4):
    cache = {}

    def get(cp, mode, name, backend="torch"):
        key = (cp, mode, name, backend)
        if key not in cache:
            cache[key] = world4.run(_attention_case, mode, name, backend, nranks=cp)
        return cache[key]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_full_attention(attention_results, cp, mode, name):
    """fp32 output and q/k/v gradients of every rank's shard within 1e-5 of single-rank attention."""
    for rank, res in enumerate(attention_results(cp, mode, name)):
        bad = {k: v for k, v in res["errors"].items() if not v <= ATOL}
        assert not bad, f"cp={cp} {mode} {name} rank {rank}: {bad}"
        if mode == "ring":  # fully masked blocks are skipped in forward and in backward
            assert res["calls"] == {"forward": res["visible"], "backward": res["visible"]}
    if mode == "ring" and name == "tiny_docs" and cp == 4:
        assert min(res["visible"] for res in attention_results(cp, mode, name)) < cp


@pytest.mark.slow  # the Triton interpreter: about a minute on 2 cores
@pytest.mark.parametrize("name", ["gqa_causal", "tiny_docs"])
def test_ring_with_triton_block_kernels(attention_results, name):
    """The Triton per-block kernels (interpreted on CPU) take the plan's sub-blocks, empty documents
    and true positions just as the reference does."""
    for rank, res in enumerate(attention_results(2, "ring", name, "triton")):
        bad = {k: v for k, v in res["errors"].items() if not v <= ATOL}
        assert not bad, f"triton ring {name} rank {rank}: {bad}"


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("cp", [2, 4])
def test_comm_bytes_match_formula(attention_results, cp, mode):
    for name in ("gqa_causal", "mqa_causal"):
        for res in attention_results(cp, mode, name):
            t, hq, hkv = res["local"]
            word = 4  # fp32
            if mode == "ring":
                kv = 2 * t * hkv * HEAD_DIM * word
                expected = {"ring_fwd": (cp - 1) * kv, "ring_bwd_kv": (cp - 1) * kv, "ring_bwd_dkv": cp * kv}
            else:
                hkv_sent = hkv * cp // math.gcd(hkv, cp)  # kv heads replicated until cp divides them
                local = (2 * hq + 2 * hkv_sent) * t * HEAD_DIM * word  # q, k, v, out
                expected = {"ulysses_fwd": (cp - 1) * local // cp, "ulysses_bwd": (cp - 1) * local // cp}
            assert res["bytes"] == expected, (name, res["bytes"], expected)


def test_ring_comm_refuses_misuse(world4):
    for rank, (errors, received) in enumerate(world4.run(_ring_comm_refuses_misuse, nranks=2)):
        assert len(errors) == 3 and "without" in errors[0] and "nothing queued" in errors[1], errors
        assert "in flight" in errors[2]
        assert received == [float(1 - rank)] * 3


# ----------------------------------------------------------------------------- full model


LAYOUTS = {
    "cp2_ring": (2, ["parallel.cp=2"]),
    "cp2_ulysses": (2, ["parallel.cp=2", "parallel.cp_mode=ulysses"]),
    "cp2_tp2_sp": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true"]),
    "cp2_dp2": (4, ["parallel.cp=2"]),
    "cp4_ring": (4, ["parallel.cp=4"]),
    "cp2_tp2_sp_ulysses": (4, ["parallel.cp=2", "parallel.tp=2", "parallel.sp=true", "parallel.cp_mode=ulysses"]),
}


@pytest.fixture(scope="module")
def reference(world4):
    return world4.run(train_layout, CONFIG, BASE, nranks=1)[0]


@pytest.mark.parametrize("layout", params(LAYOUTS, slow=("cp2_tp2_sp_ulysses",)))
def test_cp_parity_with_world_size_1(world4, reference, layout):
    nranks, overrides = LAYOUTS[layout]
    out = world4.run(train_layout, CONFIG, BASE + overrides, nranks=nranks)[0]
    assert_parity(reference, out)


def _per_token_losses(cp, mode, lens, ids_list):
    """Per-token losses ``[T]`` (full order) of a tiny CP model for each input in ``ids_list``."""
    import torch.nn.functional as F

    from loom.data import Microbatch
    from loom.model.decoder import build_model
    from loom.parallel.context_parallel import shard_microbatch
    from loom.parallel.mesh import ParallelDims, ParallelGroups
    from loom.parallel.parallelize import parallelize

    cfg = load_config(os.path.join(ROOT, CONFIG), [f"parallel.cp={cp}", f"parallel.cp_mode={mode}",
                                                   "model.attn_backend=torch"])
    groups = ParallelGroups(ParallelDims(cp=cp))
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), groups, cfg)
    cu = cu_of(lens)
    positions = torch.cat([torch.arange(n) for n in lens]).int()
    ends = cu[1:].long() - 1
    out = []
    for ids in ids_list:
        labels = torch.cat([ids[1:], ids[:1]]).clone()
        labels[ends] = -100  # each document predicts only its own next tokens
        mb = Microbatch(ids, labels, positions, cu, max(lens), 1, int((labels != -100).sum()))
        batch, local_labels = shard_microbatch(mb, cp, groups.cp_rank)
        with torch.no_grad():
            loss = F.cross_entropy(model(batch), local_labels, ignore_index=-100, reduction="none")
            out.append(batch.attn.plan.unshard(loss, groups.cp))
    groups.destroy()
    return out


def _leak_check(cp, mode):
    lens = [5, 1, 2, 3, 20, 1, 9, 23]  # 64 tokens
    cu = cu_of(lens)
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (64,))
    variants = [ids]
    for doc in (4, 2):  # the long document, then one of two tokens
        changed = ids.clone()
        changed[cu[doc]:cu[doc + 1]] = torch.randint(0, 256, (lens[doc],))
        variants.append(changed)
    docwise = _per_token_losses(cp, mode, lens, variants)
    merged = _per_token_losses(cp, mode, [64], variants[:2])  # one document: changes must show up
    return docwise, merged


@pytest.mark.parametrize("mode", ["ring", "ulysses"])
@pytest.mark.parametrize("cp", [2, 4])
def test_no_attention_across_document_borders(world4, cp, mode):
    """Changing one document's tokens leaves every other document's per-token losses identical."""
    lens = [5, 1, 2, 3, 20, 1, 9, 23]
    cu = cu_of(lens).tolist()
    docwise, merged = world4.run(_leak_check, cp, mode, nranks=cp)[0]
    for variant, doc in ((1, 4), (2, 2)):
        inside = torch.zeros(64, dtype=torch.bool)
        inside[cu[doc]:cu[doc + 1]] = True
        assert torch.equal(docwise[variant][~inside], docwise[0][~inside]), f"document {doc} leaked"
        assert not torch.equal(docwise[variant][inside], docwise[0][inside])
    # The check can fail: were these one document, the tokens after the change would see it.
    after = torch.arange(64) >= cu[5]
    assert not torch.equal(merged[1][after], merged[0][after])


def test_bf16_cp_tracks_fp32(world4, reference):
    """bf16 is not exact, but ring attention under autocast (fp32 merge) stays close to fp32 at world size 1."""
    overrides = ["train.dtype=bf16", "train.run_dir=runs/test_cp_bf16", "model.attn_backend=torch",
                 "parallel.cp=2"]
    out = world4.run(train_layout, CONFIG, overrides, steps=3, nranks=2)[0]
    for a, b in zip(reference["losses"][:3], out["losses"]):
        assert abs(a - b) / a < 2e-2, (reference["losses"], out["losses"])
