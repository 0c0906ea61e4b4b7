"""The parity harness checks itself: break one thing per parallel dimension and the check must fail.

Each mutation is a monkeypatch applied inside the rank processes for one run, then undone (the
workers run other tasks next). A clean run of the same layout passes, so it is the mutation, not
the setup, that fails; a counter from the ranks shows the patch really fired, so a refactor that
moves the patched code makes this test fail instead of passing without breaking anything.
"""
import collections
import contextlib
import dataclasses

import numpy as np
import pytest

from tests.parity import LOSS_RTOL, RTOL, assert_close_tensors, assert_parity, train_layout

pytestmark = pytest.mark.slow

DENSE = "launch/configs/tiny_dense.yaml"
MOE = "launch/configs/tiny_moe.yaml"
BASE = ["train.dtype=fp32", "train.run_dir=runs/test_mutations", "model.attn_backend=torch", "checkpoint.resume=none"]
STEPS = 2

# Per worker process: how often each mutation changed what the engine did.
_fired: collections.Counter = collections.Counter()


@contextlib.contextmanager
def _replaced(owner, name: str, value):
    original = owner.__dict__[name]  # the raw attribute: a staticmethod stays one when restored
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _tp_partial_input_grad():
    """Entering the TP region no longer sums the input gradient over TP: each rank keeps its partial."""
    from loom.parallel import comm

    def backward(ctx, g):
        _fired["tp"] += 1
        return g, None

    return _replaced(comm.CopyToRegion, "backward", staticmethod(backward))


def _cp_ring_skips_last_block():
    """The K/V block that arrives at the last ring step is passed on but never merged (forward)."""
    from loom.parallel import comm
    from loom.parallel import ring_attention as ring

    forward = ring._ring_forward

    def ring_forward(q, k, v, blocks, group, *args):
        size = comm.group_size(group)
        last = (comm.group_rank(group) - (size - 1)) % size  # whose K/V arrives last
        if blocks[last].visible:
            _fired["cp"] += 1
        blocks = [dataclasses.replace(b, visible=False) if s == last else b for s, b in enumerate(blocks)]
        return forward(q, k, v, blocks, group, *args)

    return _replaced(ring, "_ring_forward", ring_forward)


def _ep_swapped_shards():
    """Each EP rank starts with the next EP rank's expert shard, while the dispatcher still routes by the
    true rank (initial values follow each shard's spec, so the swap is made after initialisation)."""
    import torch

    from loom.parallel import comm
    from loom.parallel.sharding import spec_of
    from loom.train import setup

    initialize = setup.initialize

    def initialize_swapped(chunks, rules, cfg):
        initialize(chunks, rules, cfg)
        for chunk in chunks:
            for param in chunk.parameters():
                spec = spec_of(param)
                if spec.expert and spec.splits and spec.splits[0][0] == 0:
                    group = spec.splits[0][1]
                    parts = comm.all_gather(param.data, group, 0).chunk(comm.group_size(group))
                    with torch.no_grad():
                        param.copy_(parts[(comm.group_rank(group) + 1) % len(parts)])
                    _fired["ep"] += 1

    return _replaced(setup, "initialize", initialize_swapped)


def _pp_drops_microbatch0_grad():
    """The last stage skips the backward of microbatch 0, so a zero gradient goes upstream."""
    from loom.parallel.pipeline import PipelineExecutor

    backward = PipelineExecutor._backward

    def _backward(self, state, a):
        x, out = state.saved[(a.mb, a.chunk)]
        if a.mb == 0 and out.output is None and out.objective is not None:  # only the last stage has no output
            state.saved[(a.mb, a.chunk)] = (x, out._replace(objective=out.objective.detach()))
            _fired["pp"] += 1
        return backward(self, state, a)

    return _replaced(PipelineExecutor, "_backward", _backward)


@contextlib.contextmanager
def _dp_skips_bucket0():
    """Bucket 0 gets a group of one, so it is never reduced over DP; the other buckets still are."""
    from loom.parallel.data_parallel import GradBuffer

    make, finish = GradBuffer._make_buckets, GradBuffer.finish

    def _make_buckets(self, max_numel):
        buckets = make(self, max_numel)
        buckets[0].group, buckets[0].sharded = None, False
        return buckets

    def finish_(self):
        self._launch_ready(force=True)  # idempotent: finish() launches the rest itself
        if self.buckets[0].work is None and any(b.work is not None for b in self.buckets[1:]):
            _fired["dp"] += 1
        return finish(self)

    with _replaced(GradBuffer, "_make_buckets", _make_buckets), _replaced(GradBuffer, "finish", finish_):
        yield


# Far off: a thousand times the gradient tolerance, ten times the loss tolerance (a forward
# mutation moves the loss of the first step only by ~2e-4: the model is near its initial loss).
GRADS, LOSS, SYNC = {"first_grads": 1e3 * RTOL}, {"first_loss": 10 * LOSS_RTOL}, {"out_of_sync": 1}
# name: (patch, config, layout, the assert_parity message that must catch it (its first failing
# check), and the measures that must be far off, with how far at least)
MUTATIONS = {
    # TP-replicated norms get different partial gradients on each TP rank: replicas drift apart.
    "tp": (_tp_partial_input_grad, DENSE, ["parallel.tp=2"], "replicas differ", {**GRADS, **SYNC}),
    "cp": (_cp_ring_skips_last_block, DENSE, ["parallel.cp=2"], "losses differ", {**GRADS, **LOSS}),
    # The gathered initial weights show the swap (two unrelated tensors: off by ~sqrt(2)). The first
    # loss barely moves at initialisation; the wrong gradients move the second one, by only ~1e-4, so
    # the gradient norm check may be the first to fail instead.
    "ep": (_ep_swapped_shards, MOE, ["parallel.ep=2"], "losses differ|grad norms differ", {**GRADS, "initial": 1.0}),
    # Losing 1 of 8 microbatches moves the second loss by only ~3e-5, so likewise.
    "pp": (_pp_drops_microbatch0_grad, DENSE, ["parallel.pp=2"], "losses differ|grad norms differ", GRADS),
    # A tiny bucket size: several buckets, so "bucket 0 only" leaves the others reduced.
    "dp": (_dp_skips_bucket0, DENSE, ["parallel.bucket_size_mb=0.01"], "replicas differ", {**GRADS, **SYNC}),
}


def _mutated_run(mutation: str | None, config: str, overrides: list[str], steps: int) -> dict:
    """``train_layout`` with ``mutation`` applied in this rank; every rank reports how often it fired."""
    _fired.clear()
    patch = MUTATIONS[mutation][0]() if mutation else contextlib.nullcontext()
    with patch:
        out = train_layout(config, overrides, steps)
    return {"run": out, "fired": _fired[mutation] if mutation else 0}


def _divergence(ref: dict, out: dict) -> dict[str, float]:
    """How far ``out`` is from ``ref`` in each measure that assert_parity checks, without asserting."""
    def rel(key, n=None):
        got, want = np.array(out[key][:n]), np.array(ref[key][:n])
        return float(np.max(np.abs(got - want) / np.abs(want)))

    tensors = lambda kind: assert_close_tensors(kind, ref[kind], out[kind], float("inf"))  # noqa: E731
    return {"first_loss": rel("losses", 1), "losses": rel("losses"), "grad_norms": rel("grad_norms"),
            "first_grads": tensors("first_grads"), "last_grads": tensors("last_grads"),
            "initial": tensors("initial"), "params": tensors("params"), "out_of_sync": float(len(out["out_of_sync"]))}


@pytest.fixture(scope="module")
def references(world2):
    """World size 1 for each config, trained once (world1_references trains its own step count)."""
    cache = {}

    def get(config: str) -> dict:
        if config not in cache:
            cache[config] = world2.run(train_layout, config, BASE, STEPS, nranks=1)[0]
        return cache[config]

    return get


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_parity_catches_mutation(world2, references, mutation):
    _, config, overrides, message, far_off = MUTATIONS[mutation]
    ref = references(config)
    clean = world2.run(_mutated_run, None, config, BASE + overrides, STEPS, nranks=2)
    assert_parity(ref, clean[0]["run"])
    mutated = world2.run(_mutated_run, mutation, config, BASE + overrides, STEPS, nranks=2)
    fired = [r["fired"] for r in mutated]
    assert sum(fired) > 0, f"the {mutation} mutation never changed anything: is the patch stale?"
    with pytest.raises(AssertionError, match=message) as caught:
        assert_parity(ref, mutated[0]["run"])
    off = _divergence(ref, mutated[0]["run"])
    print(f"\n{mutation}: fired {fired}; caught by: {str(caught.value)[:100]}\n  "
          + ", ".join(f"{k} {v:.2e}" for k, v in off.items()))
    # Not a near miss: the measures this mutation breaks are far outside their tolerances.
    for measure, at_least in far_off.items():
        assert off[measure] >= at_least, f"{measure}: {off[measure]:.2e} < {at_least:.0e} ({off})"
