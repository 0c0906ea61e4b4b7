"""Failures a cluster sees, on 2 CPU ranks under torchrun: a rank killed (the job restarts itself and
continues exactly), a preemption signal (a checkpoint, exit 0, an exact resume), a stalled rank (an
error naming the collective, not a hang, and every rank's stack), ranks that disagree (named before
the first step). Faults come from ``LOOM_FAULT`` (engine/faults.py)."""
import json
import os
import subprocess
import time

import pytest

import loom.faults as faults
from loom.config import load_config
from loom.parallel.intercept import Call
from loom.parallel.dry_run import digests, first_disagreement, streams_agree
from loom.train.preflight import identity_disagreement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "launch/configs/tiny_dense.yaml"
STEPS = 8
ARGS = ["--config", CONFIG, "runtime.device=cpu", f"train.steps={STEPS}", "train.log_samples=true",
        "runtime.collective_timeout_s=30"]


def launch(run_dir, *overrides, fault: str = "", restarts: int = 0, timeout: float = 180):
    """``launch/run_local.sh 2`` with ``overrides``; returns (exit code, output, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOOM_FAULT": fault, "MAX_RESTARTS": str(restarts)}
    cmd = ["bash", "launch/run_local.sh", "2", *ARGS, f"train.run_dir={run_dir}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def attempts(run_dir, launched: int = 0) -> list[list[dict]]:
    """metrics.jsonl split where torchrun restarted the job, after the first ``launched`` records
    (a previous launch's)."""
    every = records(run_dir)
    out = [every[:launched], []] if launched else [[]]
    for r in every[launched:]:
        if out[-1] and r["restart"] != out[-1][-1]["restart"]:
            out.append([])
        out[-1].append(r)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    code, out, _ = launch(run_dir, "checkpoint.save_interval=2")
    assert code == 0, out[-3000:]
    return {r["step"]: r for r in records(run_dir)}


def assert_continues_exactly(runs: list[list[dict]], reference: dict, resume_step: int) -> None:
    """The effective run (each step from the attempt that the final model descends from) equals the
    uninterrupted one from the resume point on, and consumed every global batch once, in order."""
    *before, last = runs
    assert last[0]["step"] == resume_step + 1, [r["step"] for r in last]
    kept = [r for a in before for r in a if r["step"] <= resume_step] + last
    assert [r["step"] for r in kept] == list(range(1, STEPS + 1)), "a step is missing or repeated"
    assert [r["samples"] for r in kept] == [reference[s]["samples"] for s in range(1, STEPS + 1)]
    for r in last:
        assert r["loss"] == reference[r["step"]]["loss"], (r["step"], r["loss"], reference[r["step"]]["loss"])
        assert r["grad_norm"] == reference[r["step"]]["grad_norm"]


@pytest.mark.slow
@pytest.mark.parametrize("fault,resume_step", [("kill:rank=1,step=5", 4), ("kill:rank=1,step=6,at=save", 4)],
                         ids=["mid-step", "mid-save"])
def test_killed_rank_restarts_and_continues_exactly(tmp_path, uninterrupted, fault, resume_step):
    code, out, _ = launch(tmp_path, "checkpoint.save_interval=2", "checkpoint.keep_checkpoints=0", fault=fault, restarts=1)
    assert code == 0, out[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{resume_step:08d}'} at step {resume_step}" in out
    assert len(attempts(tmp_path)) == 2, "the job did not restart"
    assert_continues_exactly(attempts(tmp_path), uninterrupted, resume_step)
    if "save" in fault:  # the save the kill interrupted was left unmarked, and the restart passed it by
        assert f"ignoring incomplete checkpoint {tmp_path / 'checkpoints' / 'step_00000006'}" in out, out[-3000:]


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, uninterrupted):
    code, out, _ = launch(tmp_path, "checkpoint.save_interval=0", fault="term:rank=1,step=3")
    assert code == 0, out[-3000:]
    assert "rank 1: SIGTERM: every rank saves a checkpoint at the end of this step" in out, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]
    code, out, _ = launch(tmp_path, "checkpoint.save_interval=0")
    assert code == 0, out[-3000:]
    assert_continues_exactly(attempts(tmp_path, launched=3), uninterrupted, 3)


@pytest.mark.slow
def test_stalled_rank_fails_naming_the_collective(tmp_path):
    fault = "stall:rank=1,step=2,seconds=5,call=3"
    code, out, seconds = launch(tmp_path, "parallel.tp=2", "runtime.collective_timeout_s=2",
                                "runtime.step_timeout_s=1", fault=fault, timeout=120)
    assert code != 0
    assert seconds < 60, f"took {seconds:.0f} s"
    assert ("rank 0: all_reduce of float32[64, 64] on group tp (ranks [0, 1]), call 3 of step 2, "
            "did not complete within runtime.collective_timeout_s=2") in out, out[-3000:]
    waiting = (tmp_path / "stacks.rank0.txt").read_text()
    stalled = (tmp_path / "stacks.rank1.txt").read_text()
    assert "Timeout" in waiting and "in all_reduce" in waiting and "in forward_backward" in waiting
    assert "in before_collective" in stalled


@pytest.mark.slow
def test_preflight_names_a_rank_with_another_config(tmp_path):
    code, out, seconds = launch(tmp_path, "parallel.tp=2", fault="override:rank=1,train.micro_batch_size=2")
    assert code != 0
    assert seconds < 60
    assert ("rank 1 has config train.micro_batch_size=2 where rank 0 has train.micro_batch_size=1") in out, out[-3000:]
    assert not (tmp_path / "metrics.jsonl").exists() or not records(tmp_path)


# ----------------------------------------------------------------------------- in-process


def disagreeing_microbatches(fault_rank: int):
    """TP2 where one rank runs microbatches twice as large: its tensor-parallel collectives differ."""
    import torch.distributed as dist

    from loom.train.preflight import PreflightError
    from loom.train.trainer import Trainer, build_groups

    micro = 2 if dist.get_rank() == fault_rank else 1
    cfg = load_config(os.path.join(ROOT, CONFIG), ["runtime.device=cpu", "parallel.tp=2", "runtime.preflight=false",
                                                   "checkpoint.resume=none", f"train.micro_batch_size={micro}",
                                                   "model.attn_backend=torch"])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    try:
        trainer.preflight()
        return None
    except PreflightError as e:
        return str(e)
    finally:
        groups.destroy()


def test_preflight_names_the_first_differing_collective(world2):
    messages = world2.run(disagreeing_microbatches, 1)
    assert messages[0] == messages[1] and messages[0] is not None
    expected = ("collective #0 on group tp/tp_cp/mp/world (ranks [0, 1]): rank 0 issues all_reduce of "
                "float32[64, 64], rank 1 issues all_reduce of float32[128, 64]")
    assert messages[0].endswith(expected), messages[0]


def test_preflight_passes_when_ranks_agree(world2):
    assert world2.run(disagreeing_microbatches, -1) == [None, None]


def test_first_disagreement_names_rank_and_call():
    g, w = (0, 1), (0, 1, 2, 3)
    ar = Call("all_reduce", g, (4,), "float32")
    same = [[ar, Call("all_reduce", w, (), "float32")]] * 4
    assert first_disagreement(same) is None and streams_agree([digests(c) for c in same])
    other = [same[0], [Call("all_reduce", g, (8,), "float32"), same[0][1]], same[0], same[0]]
    assert not streams_agree([digests(c) for c in other])
    assert first_disagreement(other) == ("collective #0 on group ranks [0, 1]: rank 0 issues all_reduce of "
                                         "float32[4], rank 1 issues all_reduce of float32[8]")
    missing = [same[0], same[0], same[0], [ar]]
    assert "rank 3 issues nothing" in first_disagreement(missing)
    send, recv = Call("isend", w, (2, 3), "float32", peer=1), Call("irecv", w, (2, 4), "float32", peer=0)
    p2p = [[send], [recv]]
    assert not streams_agree([digests(c) for c in p2p])
    assert first_disagreement(p2p) == ("message #0 from rank 0 to rank 1: rank 0 issues isend of float32[2, 3] "
                                       "to rank 1, rank 1 issues irecv of float32[2, 4] from rank 0")
    assert streams_agree([digests([send]), digests([Call("irecv", w, (2, 3), "float32", peer=0)])])


def test_identity_disagreement_names_the_key():
    base = {"code": "a", "config": {"train.seed": 1, "parallel.tp": 2}, "resume": None}
    assert identity_disagreement([base, dict(base)]) is None
    assert "rank 1 runs different code" in identity_disagreement([base, {**base, "code": "b"}])
    changed = {**base, "config": {"train.seed": 1, "parallel.tp": 1}}
    assert identity_disagreement([base, base, changed]) == (
        "rank 2 has config parallel.tp=1 where rank 0 has parallel.tp=2: every rank must run the same config")
    assert "rank 1 resumes from /x" in identity_disagreement([base, {**base, "resume": "/x"}])


def test_fault_spec_parses_and_fires_on_the_first_attempt_only(monkeypatch):
    monkeypatch.setenv("LOOM_FAULT", "override:rank=1,train.micro_batch_size=2;stall:rank=0,step=2,seconds=0")
    assert faults.config_overrides(1) == ["train.micro_batch_size=2"] and faults.config_overrides(0) == []
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.config_overrides(1) == []
    with pytest.raises(ValueError, match="LOOM_FAULT entry 'explode:rank=1'"):
        faults.parse("explode:rank=1")


def train_twice(preflight: bool, layout=("parallel.ep=2",)):
    """Two steps of a MoE model, by default under EP2 (all-to-all dispatch, per-step statistics, router bias)."""
    from loom.train.trainer import Trainer, build_groups

    cfg = load_config(os.path.join(ROOT, "launch/configs/tiny_moe.yaml"),
                      ["runtime.device=cpu", *layout, "checkpoint.resume=none", "train.steps=2",
                       "model.attn_backend=torch", "train.log_interval=100", f"runtime.preflight={preflight}",
                       f"train.run_dir={os.environ.get('TMPDIR', '/tmp')}/loom-preflight-{preflight}"])
    groups = build_groups(cfg)
    trainer = Trainer(cfg, groups)
    history = trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    groups.destroy()
    return [(r["loss"], r["grad_norm"], r["expert_load"], r["aux_loss"]) for r in history], params


def test_the_dry_run_leaves_no_trace(world2):
    """The pre-flight dry step must not change the weights, the statistics or the random stream."""
    import torch

    runs = zip(world2.run(train_twice, True), world2.run(train_twice, False))
    for (with_check, params), (without, reference) in runs:
        assert with_check == without
        assert all(torch.equal(params[n], reference[n]) for n in reference)


ZB1_LORA = ("parallel.pp=2", "parallel.pp_layout=[2,1]", "parallel.pp_schedule=zb1", "finetune.lora.rank=4")


@pytest.mark.slow
def test_the_dry_run_passes_zb1_with_lora(world2):
    """The dry step runs the zero-bubble schedule (its deferred weight-gradient passes, which skip a
    frozen base) and still leaves no trace."""
    import torch

    runs = zip(world2.run(train_twice, True, ZB1_LORA), world2.run(train_twice, False, ZB1_LORA))
    for (with_check, params), (without, reference) in runs:
        assert with_check == without
        assert all(torch.equal(params[n], reference[n]) for n in reference)
