"""Checkpoints: exact resume in one layout, resharding resume across layouts, atomicity and corruption.

Every run records the tokens each rank consumed, so "identical sample order" is checked on the
real microbatches, not on the sampler alone, and ends with its full parameters and AdamW state
gathered to global shapes, so a resume is checked tensor by tensor, not on the loss alone.
"""
import os
import re
import warnings

import numpy as np
import pytest

from tests.harness import RankError
from tests.parity import ROOT

CONFIG = "launch/configs/tiny_dense.yaml"
MOE_CONFIG = "launch/configs/tiny_moe.yaml"
BASE = ["train.dtype=fp32", "model.attn_backend=torch", "train.steps=10", "train.log_interval=100"]
LOSS_RTOL = 1e-5
STATE_RTOL = 1e-5  # per tensor, ||got - ref|| / ||ref||; fp32 reduction order across layouts is ~1e-7


def _train(run_dir, overrides, until=None, crash_rank=None, config=CONFIG):
    """One rank: train (saving as configured) to ``until``; return what this rank saw."""
    import torch

    from loom.config import load_config
    from loom.train import checkpoint
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, config), [*BASE, f"train.run_dir={run_dir}", *overrides])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    start, seen = trainer.step, {}
    microbatches = trainer.microbatches

    def record(step):
        mbs = microbatches(step)
        seen[step] = torch.cat([mb.input_ids for mb in mbs]).numpy()
        return mbs

    trainer.microbatches = record
    if crash_rank == groups.rank:
        _crash_while_writing()
    history = trainer.fit(until)
    state = checkpoint.global_state(trainer.model, trainer.optimizer, cfg.model.tie_embeddings)
    out = {"start": start, "losses": [r["loss"] for r in history], "tokens": seen,
           "dp_rank": groups.dp_rank,
           "replica_lead": groups.tp_rank == 0 and groups.cp_rank == 0 and groups.pp_rank == 0,
           "state": {k: v.float().numpy() for k, v in state.items()} if groups.rank == 0 else None}
    groups.destroy()
    return out


def _crash_while_writing():
    """Die (like a killed process) right after this rank wrote its data file, before the marker."""
    import torch.distributed.checkpoint as dcp

    write_data = dcp.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        write_data(self, plan, planner).wait()
        os._exit(17)

    dcp.FileSystemWriter.write_data = write_then_die


def _global_tokens(results):
    """step -> the global batch's tokens, assembled from the replica leads in DP order."""
    leads = sorted((r for r in results if r["replica_lead"]), key=lambda r: r["dp_rank"])
    return {step: np.concatenate([r["tokens"][step] for r in leads]) for step in leads[0]["tokens"]}


def _assert_same_stream(got, ref):
    for step, tokens in got.items():
        assert np.array_equal(tokens, ref[step]), f"step {step}: the resumed run consumed other samples"


def _assert_close(got, ref):
    got, ref = np.array(got), np.array(ref)
    assert np.abs(got / ref - 1).max() <= LOSS_RTOL, f"{got.tolist()} vs {ref.tolist()}"


def _assert_same_state(got, ref, rtol=STATE_RTOL):
    """Every parameter and AdamW state (exp_avg, exp_avg_sq, step) at global shape: ||got - ref|| <= rtol ||ref||."""
    assert got.keys() == ref.keys(), f"tensors only in one run: {sorted(got.keys() ^ ref.keys())}"
    assert any("/exp_avg_sq" in k for k in ref) and any(k.endswith("/step") for k in ref), "no AdamW state"
    errors = {k: _relative_error(got[k], ref[k]) for k in ref}
    bad = sorted(((e, k) for k, e in errors.items() if not e <= rtol), reverse=True)
    assert not bad, f"{len(bad)} tensor(s) differ from the uninterrupted run by more than {rtol}: {bad[:6]}"
    return max(errors.values())


def _relative_error(got, ref):
    assert got.shape == ref.shape, f"shape {got.shape} vs {ref.shape}"
    diff = np.linalg.norm((got.astype(np.float64) - ref).ravel())
    scale = np.linalg.norm(ref.astype(np.float64).ravel())
    return float(diff / scale) if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _ckpt(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


@pytest.fixture(scope="module")
def reference(world4, tmp_path_factory):
    """10 uninterrupted steps at TP2 x DP2, and the same run stopped after 5 (checkpoint at step 5)."""
    root = tmp_path_factory.mktemp("ckpt")
    full = world4.run(_train, str(root / "full"), ["parallel.tp=2"])
    stopped_dir = str(root / "stopped")
    stopped = world4.run(_train, stopped_dir, ["parallel.tp=2", "checkpoint.save_interval=5"], until=5)
    return {"root": root, "losses": full[0]["losses"], "tokens": _global_tokens(full), "state": full[0]["state"],
            "stopped_dir": stopped_dir, "stopped": stopped[0]}


def test_resume_same_layout_is_bit_exact(world4, reference):
    stopped_dir = reference["stopped_dir"]
    assert os.path.isfile(os.path.join(_ckpt(stopped_dir, 5), "checkpoint.json"))
    out = world4.run(_train, stopped_dir, ["parallel.tp=2", "checkpoint.save_interval=5"])  # resume: auto
    assert out[0]["start"] == 5
    losses = reference["stopped"]["losses"] + out[0]["losses"]
    assert losses == reference["losses"], f"{losses} != {reference['losses']}"
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    assert _assert_same_state(out[0]["state"], reference["state"], rtol=0) == 0


@pytest.mark.parametrize("nranks,overrides", [
    (4, []),  # TP2 x DP2 -> DP4
    (1, ["train.micro_batch_size=4"]),  # TP2 x DP2 -> DP1 with 2 microbatches
], ids=["tp2dp2_to_dp4", "tp2dp2_to_dp1_2mb"])
def test_resume_other_layout(world4, reference, nranks, overrides):
    run_dir = str(reference["root"] / f"other_{nranks}")
    out = world4.run(_train, run_dir, [f"checkpoint.resume={_ckpt(reference['stopped_dir'], 5)}", *overrides],
                     nranks=nranks)
    assert out[0]["start"] == 5
    _assert_close(out[0]["losses"], reference["losses"][5:])
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    _assert_same_state(out[0]["state"], reference["state"])


@pytest.mark.parametrize("nranks,overrides", [
    (2, []),  # DP4 -> DP2
    pytest.param(4, ["parallel.tp=2"], marks=pytest.mark.slow),  # DP4 -> TP2 x DP2
], ids=["dp4_to_dp2", "dp4_to_tp2dp2"])
def test_distributed_optimizer_dp4_resumes(world4, reference, nranks, overrides):
    """The distributed optimizer's shards, saved at DP4 (a quarter of every bucket per rank, cut
    anywhere inside a parameter), resume at DP2 and at TP2 x DP2 as an uninterrupted run continues."""
    run_dir = str(reference["root"] / "distopt_dp4")
    if not os.path.isdir(_ckpt(run_dir, 5)):
        first = world4.run(_train, run_dir, ["optim.distributed=true", "checkpoint.save_interval=5"], until=5)
        _assert_close(first[0]["losses"], reference["losses"][:5])
    out = world4.run(_train, str(reference["root"] / f"distopt_dp4_to_{nranks}"),
                     [f"checkpoint.resume={_ckpt(run_dir, 5)}", "optim.distributed=true", *overrides], nranks=nranks)
    assert out[0]["start"] == 5
    _assert_close(out[0]["losses"], reference["losses"][5:])
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    _assert_same_state(out[0]["state"], reference["state"])


@pytest.mark.slow
def test_bf16_resume_restores_fp32_masters(world4, tmp_path):
    """bf16 parameters are their fp32 masters rounded: a DP2 run with the distributed optimizer, stopped at
    step 5 and resumed, ends bit-identical to the uninterrupted run only if the masters came back."""
    bf16 = ["train.dtype=bf16", "optim.distributed=true"]
    full = world4.run(_train, str(tmp_path / "full"), bf16, nranks=2)
    run_dir = str(tmp_path / "stopped")
    first = world4.run(_train, run_dir, [*bf16, "checkpoint.save_interval=5"], until=5, nranks=2)
    out = world4.run(_train, run_dir, [*bf16, "checkpoint.save_interval=5"], nranks=2)
    assert out[0]["start"] == 5 and first[0]["losses"] + out[0]["losses"] == full[0]["losses"]
    assert any(k.endswith("/master") for k in full[0]["state"])
    assert _assert_same_state(out[0]["state"], full[0]["state"], rtol=0) == 0


def test_resume_tp2_pp2_to_dp4(world4, reference):
    """Pipeline stages own disjoint names; the resumed DP4 run reads every stage's tensors."""
    run_dir = str(reference["root"] / "tp2pp2")
    first = world4.run(_train, run_dir, ["parallel.tp=2", "parallel.pp=2", "checkpoint.save_interval=5"], until=5)
    _assert_close(first[0]["losses"], reference["losses"][:5])
    out = world4.run(_train, str(reference["root"] / "tp2pp2_dp4"), [f"checkpoint.resume={_ckpt(run_dir, 5)}"])
    assert out[0]["start"] == 5
    _assert_close(out[0]["losses"], reference["losses"][5:])
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    _assert_same_state(out[0]["state"], reference["state"])


@pytest.mark.slow
def test_resume_interleaved_tied_pipeline_to_cp2_tp2(world4, tmp_path):
    """PP2 x VPP2 x DP2 with the tied embedding and head on different pipeline ranks saves;
    CP2 x TP2 (+SP) resumes. Both match an uninterrupted DP4 run, sample for sample."""
    model = ["model.num_layers=4", "model.tie_embeddings=true"]
    full = world4.run(_train, str(tmp_path / "full"), model)
    ref_tokens = _global_tokens(full)
    saved = str(tmp_path / "vpp")
    first = world4.run(_train, saved, model + ["parallel.pp=2", "parallel.vpp=2", "parallel.pp_schedule=interleaved",
                                               "checkpoint.save_interval=5"], until=5)
    _assert_close(first[0]["losses"], full[0]["losses"][:5])
    out = world4.run(_train, str(tmp_path / "cp2tp2"), model + [
        f"checkpoint.resume={_ckpt(saved, 5)}", "parallel.cp=2", "parallel.tp=2", "parallel.sp=true"])
    assert out[0]["start"] == 5
    _assert_close(out[0]["losses"], full[0]["losses"][5:])
    _assert_same_stream(_global_tokens(out), ref_tokens)
    _assert_same_state(out[0]["state"], full[0]["state"])


def test_resume_ep2_dp2_to_ep4(world4, tmp_path):
    """Experts sharded over EP2 (two expert-data-parallel replicas) reload sharded over EP4."""
    full = world4.run(_train, str(tmp_path / "full"), ["parallel.ep=2"], config=MOE_CONFIG)
    run_dir = str(tmp_path / "ep2")
    world4.run(_train, run_dir, ["parallel.ep=2", "checkpoint.save_interval=5"], until=5, config=MOE_CONFIG)
    out = world4.run(_train, str(tmp_path / "ep4"), ["parallel.ep=4", f"checkpoint.resume={_ckpt(run_dir, 5)}"],
                     config=MOE_CONFIG)
    assert out[0]["start"] == 5
    _assert_close(out[0]["losses"], full[0]["losses"][5:])
    _assert_same_stream(_global_tokens(out), _global_tokens(full))
    _assert_same_state(out[0]["state"], full[0]["state"])


def test_resume_dp2_to_dp1_two_microbatches(world4, reference):
    run_dir = str(reference["root"] / "dp2")
    first = world4.run(_train, run_dir, ["checkpoint.save_interval=5"], until=5, nranks=2)
    dp1_dir = str(reference["root"] / "dp1")
    out = world4.run(_train, dp1_dir, [f"checkpoint.resume={_ckpt(run_dir, 5)}", "train.micro_batch_size=4",
                                       "checkpoint.save_interval=5"], nranks=1)
    _assert_close(first[0]["losses"] + out[0]["losses"], reference["losses"])
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    _assert_same_state(out[0]["state"], reference["state"])
    # DP replicas are written once: the DP2 checkpoint is no bigger than the world-size-1 one.
    dp2_bytes, dp1_bytes = _data_bytes(_ckpt(run_dir, 5)), _data_bytes(_ckpt(dp1_dir, 10))
    assert dp2_bytes <= 1.05 * dp1_bytes, (dp2_bytes, dp1_bytes)


def _data_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))


def test_state_check_catches_swapped_tp_halves(world4, reference):
    """A TP2 save that wrote q_proj's two exp_avg shards at each other's offsets moves the resumed
    losses by about the loss tolerance (1e-5), so only the per-tensor state check is sure to see it."""
    import json
    from pathlib import Path

    import torch

    from loom.checkpoint import storage as io

    saved, forged = _ckpt(reference["stopped_dir"], 5), reference["root"] / "swapped_halves"
    state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in io.saved_tensors(saved).items()}
    io.read_checkpoint(saved, state, {}, no_dist=True)
    key = "optim/layers.0.attn.q_proj.weight/exp_avg"  # column-parallel: TP splits dim 0
    top, bottom = state[key].chunk(2, dim=0)
    state[key] = torch.cat([bottom, top]).contiguous()
    marker = json.loads((Path(saved) / io.MARKER).read_text())
    marker = {k: v for k, v in marker.items() if k not in ("format", "version", "files")}
    io.write_checkpoint(forged, state, {}, marker, no_dist=True)

    out = world4.run(_train, str(reference["root"] / "swapped_dp4"), [f"checkpoint.resume={forged}"])
    assert out[0]["start"] == 5
    _assert_same_stream(_global_tokens(out), reference["tokens"])
    with pytest.raises(AssertionError, match=r"layers\.0\.attn\.q_proj\.weight/exp_avg'"):
        _assert_same_state(out[0]["state"], reference["state"])


# ----------------------------------------------------------------------------- faults


def _resume_error(run_dir, overrides):
    """One rank: build a trainer that must refuse its checkpoint; return the error text.

    Every rank raises before DCP's first collective, so catching it keeps the world alive.
    """
    from loom.checkpoint.storage import CheckpointError

    try:
        _train(run_dir, overrides, until=0)
    except CheckpointError as e:
        return str(e)
    raise AssertionError("the trainer accepted the checkpoint")


def test_truncated_shard_is_a_clear_error(world4, tmp_path):
    from loom.checkpoint import storage as io

    run_dir = str(tmp_path / "run")
    world4.run(_train, run_dir, ["checkpoint.save_interval=1"], until=1, nranks=2)
    path = _ckpt(run_dir, 1)
    shard = os.path.join(path, "__1_0.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    expected = rf"checkpoint .*step_00000001 is corrupt: file __1_0.distcp has {size // 2} bytes, {size} were written"
    with pytest.raises(io.CheckpointError, match=expected):
        io.read_marker(path)
    errors = world4.run(_resume_error, run_dir, ["checkpoint.resume=auto"], nranks=2)
    assert all(re.search(expected, e) for e in errors), errors


def test_resume_refuses_a_changed_data_stream(world4, tmp_path):
    run_dir = str(tmp_path / "run")
    world4.run(_train, run_dir, ["checkpoint.save_interval=1"], until=1, nranks=1)
    (error,) = world4.run(_resume_error, run_dir, ["train.global_batch_size=4"], nranks=1)
    assert "train.global_batch_size=8; this run has train.global_batch_size=4" in error


@pytest.mark.slow  # a subprocess killed mid-save
def test_killed_save_leaves_previous_checkpoint(world4, tmp_path):
    """Last in the module: the killed rank takes the world down, and nothing here needs it again."""
    from loom.checkpoint import storage as io

    run_dir = str(tmp_path / "run")
    save_every = ["checkpoint.save_interval=1", "checkpoint.keep_checkpoints=2"]
    world4.run(_train, run_dir, save_every, until=3, nranks=2)
    root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in io.list_checkpoints(root)] == [2, 3], "keep_checkpoints=2 keeps the newest two"

    with pytest.raises(RankError):  # rank 1 died; rank 0 may report the broken connection first
        world4.run(_train, run_dir, save_every, until=4, nranks=2, crash_rank=1, timeout=120)
    step4 = _ckpt(run_dir, 4)
    assert os.path.isfile(os.path.join(step4, "__1_0.distcp")), "rank 1 should have died after writing"
    assert not io.is_complete(step4)
    with pytest.warns(UserWarning, match="incomplete checkpoint .*step_00000004"):
        assert io.latest_checkpoint(root) == root / "step_00000003"
    with pytest.raises(io.CheckpointError, match=r"step_00000004 is incomplete: checkpoint.json is missing"):
        io.read_marker(step4)
    io.read_marker(root / "step_00000003")  # complete, every file intact


def test_world1_round_trip_restores_model_adam_and_rng(tmp_path):
    """In one process (no process group): every saved piece of state comes back after being disturbed."""
    import torch

    from loom.config import load_config
    from loom.model.decoder import build_model
    from loom.train import checkpoint
    from loom.train.optim import build_optimizer

    cfg = load_config(os.path.join(ROOT, CONFIG), ["model.tie_embeddings=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    model(torch.randint(0, 256, (2, 8))).square().mean().backward()
    optimizer.grads.finish()
    optimizer.step(1e-3)
    torch.rand(3)
    rng = torch.get_rng_state()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    adam = [(st["exp_avg_sq"].clone(), st["step"].clone()) for st in optimizer.states]
    checkpoint.save(tmp_path / "ck", model, optimizer, 7, cfg)
    assert "model/lm_head.weight" not in checkpoint.train_state(model, optimizer, True)[0], "tied: stored once"

    torch.rand(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for st in optimizer.states:
        st["exp_avg_sq"].zero_()
    optimizer.set_step_count(torch.tensor(0.0))
    assert checkpoint.load(tmp_path / "ck", model, optimizer, cfg) == 7
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params.items())
    assert model.lm_head.weight is model.embed.weight
    assert adam and optimizer.num_steps == 1
    for st, (exp_avg_sq, step) in zip(optimizer.states, adam):
        assert torch.equal(st["exp_avg_sq"], exp_avg_sq) and torch.equal(st["step"], step)


def test_from_pretrained_vlm_places_images_at_placeholders(tmp_path):
    """A VLM checkpoint comes back as a model taking ``(input_ids, pixel_values=[N, 3, H, W])``."""
    import torch

    import loom
    from loom.config import load_config
    from loom.model.vlm import build_vlm
    from loom.train import checkpoint
    from loom.train.optim import build_optimizer

    cfg = load_config(os.path.join(ROOT, CONFIG), ["model.vision.enabled=true", "model.vision.image_size=16",
                                                   "model.vision.patch_size=8", "model.attn_backend=torch",
                                                   "model.tie_embeddings=true"])
    torch.manual_seed(0)
    model = build_vlm(cfg.model, image_token_id=5).eval()
    checkpoint.save(tmp_path / "vlm", model, build_optimizer(model, cfg.optim), 0, cfg)
    loaded = loom.from_pretrained(tmp_path / "vlm")
    ids = torch.randint(6, 256, (1, 14))
    ids[0, 2:6] = ids[0, 8:12] = 5  # two images of 4 tokens each
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want, got = model(ids, pixel_values=pixels), loaded(ids, pixel_values=pixels)
        swapped = loaded(ids, pixel_values=pixels.flip(0))
    assert got.shape == (1, 14, 256)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (swapped[0, 6:8] - got[0, 6:8]).abs().max() > 1e-4, "images are placed in order"


def test_config_rejects_a_missing_resume_path(tmp_path):
    from loom.config import ConfigError, load_config

    cfg = load_config(os.path.join(ROOT, CONFIG), [f"checkpoint.resume={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="checkpoint.resume="):
        cfg.validate(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(os.path.join(ROOT, CONFIG), ["checkpoint.resume=none"]).validate(1)
