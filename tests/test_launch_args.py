"""What launch/run_local.sh and launch/run_multinode.sh hand to torchrun, for each form of their command line.

A fake ``torchrun`` first on PATH writes its argv, so no process group starts and each case takes milliseconds.
"""
import os
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Inherited values of these would change what the scripts pass.
SCRIPT_ENV = ("MAX_RESTARTS", "TORCHRUN_ARGS", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
              "NPROC_PER_NODE", "RUN_ID")
MULTI = ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
         "--rdzv-endpoint", "10.0.0.1:29500", "--rdzv-id", "loom"]


@pytest.fixture
def launch(tmp_path):
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    # NUL-separated, so an argument with spaces or newlines comes back whole.
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)

    def run(script, *args, ok=True, **env):
        base = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
        base["PATH"] = f"{fake.parent}{os.pathsep}{base.get('PATH', '')}"
        proc = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, env={**base, **env},
                              capture_output=True, text=True, timeout=10)
        if not ok:
            return proc
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("\0")[:-1]

    return run


def test_run_local_all_arguments_to_train_py(launch):
    argv = launch("run_local.sh", "4", "--config", "C", "a.b=v")
    assert argv == ["--standalone", "--nproc-per-node", "4", "--max-restarts", "0",
                    "launch/train.py", "--config", "C", "a.b=v"]
    assert launch("run_local.sh", "--config", "C")[:3] == ["--standalone", "--nproc-per-node", "2"]
    assert launch("run_local.sh", "--config", "C", NPROC="3", MAX_RESTARTS="2")[:5] == [
        "--standalone", "--nproc-per-node", "3", "--max-restarts", "2"]


def test_run_local_torchrun_options_before_separator(launch):
    argv = launch("run_local.sh", "2", "--max-restarts", "1", "--log-dir", "a b", "--", "--config", "C", "x=1",
                  MAX_RESTARTS="5")
    assert argv == ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--log-dir", "a b",
                    "launch/train.py", "--config", "C", "x=1"]
    argv = launch("run_local.sh", "--max_restarts=3", "--", "--config", "C", TORCHRUN_ARGS="--monitor-interval 1")
    assert argv == ["--standalone", "--nproc-per-node", "2", "--monitor-interval", "1", "--max_restarts=3",
                    "launch/train.py", "--config", "C"]


def test_run_multinode_positional_with_options(launch):
    argv = launch("run_multinode.sh", "2", "1", "10.0.0.1", "--local-addr", "10.0.0.2", "--rdzv-conf", "is_host=0",
                  "--", "--config", "C", "a.b=v", NPROC_PER_NODE="2")
    assert argv == MULTI + ["--max-restarts", "0", "--local-addr", "10.0.0.2", "--rdzv-conf", "is_host=0",
                            "launch/train.py", "--config", "C", "a.b=v"]
    argv = launch("run_multinode.sh", "2", "1", "10.0.0.1", "29600", "--", "--config", "C", NPROC_PER_NODE="2",
                  MAX_RESTARTS="4")
    assert argv == [a.replace(":29500", ":29600") for a in MULTI] + [
        "--max-restarts", "4", "launch/train.py", "--config", "C"]
    # The form without a separator: everything after the positional arguments is train.py's.
    argv = launch("run_multinode.sh", "2", "1", "10.0.0.1", "--config", "C", NPROC_PER_NODE="2")
    assert argv == MULTI + ["--max-restarts", "0", "launch/train.py", "--config", "C"]


def test_run_multinode_environment_form(launch):
    env = dict(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC_PER_NODE="2")
    assert launch("run_multinode.sh", "--config", "C", **env) == MULTI + [
        "--max-restarts", "0", "launch/train.py", "--config", "C"]
    argv = launch("run_multinode.sh", "--max-restarts", "2", "--", "--config", "C", RUN_ID="job7",
                  TORCHRUN_ARGS="--local-addr 10.0.0.2  --rdzv-conf is_host=0", **env)
    assert argv == [a.replace("loom", "job7") for a in MULTI] + [
        "--local-addr", "10.0.0.2", "--rdzv-conf", "is_host=0", "--max-restarts", "2",
        "launch/train.py", "--config", "C"]


def test_run_multinode_refuses_missing_or_extra_arguments(launch):
    proc = launch("run_multinode.sh", "--config", "C", ok=False, NNODES="2", MASTER_ADDR="10.0.0.1")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert "NODE_RANK is not set" in proc.stderr, proc.stderr
    proc = launch("run_multinode.sh", "2", "0", "h", "29500", "extra", "--", "--config", "C", ok=False)
    assert proc.returncode == 2 and "at most 4 positional arguments" in proc.stderr, proc.stderr
