"""Two nodes through launch/run_multinode.sh, simulated by two network namespaces joined by a veth pair.

Each namespace sees only its loopback and its end of the veth, while the hostname (shared by both)
resolves to 127.0.0.1: the situation where torchrun's hostname-based guesses fail, so the run needs
--local-addr, --rdzv-conf is_host and GLOO_SOCKET_IFNAME. TP2 within each node x DP2 across the two
must train exactly as the same layout does on one node.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config", "launch/configs/tiny_dense.yaml", "parallel.tp=2", "train.steps=6", "optim.lr=1e-2",
         "runtime.device=cpu"]
PORT = "29400"  # each namespace has its own ports, so a fixed one cannot collide with other runs
TIMEOUT_S = 150


@dataclass
class Host:
    ns: str
    dev: str
    addr: str


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def _kill_everything_in(ns):
    # torchrun starts its workers in sessions of their own, so killing its process group would miss them;
    # the namespace knows every process inside it.
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no `ip` (iproute2) on PATH")
    tag = f"loom{os.getpid()}"  # interface names have at most 15 characters
    hosts = [Host(f"{tag}n{i}", f"{tag}v{i}", f"10.231.0.{i + 1}") for i in range(2)]
    # A dead process with this pid may have left them behind.
    for host in hosts:
        _ip("netns", "del", host.ns, check=False)
    _ip("link", "del", hosts[0].dev, check=False)
    try:
        for host in hosts:
            proc = _ip("netns", "add", host.ns, check=False)
            if proc.returncode != 0:
                pytest.skip(f"`ip netns add {host.ns}` failed: {proc.stderr.strip()}")
        _ip("link", "add", hosts[0].dev, "type", "veth", "peer", "name", hosts[1].dev)
        for host in hosts:
            _ip("link", "set", host.dev, "netns", host.ns)
            _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", host.dev)
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "link", "set", host.dev, "up")
        yield hosts
    finally:
        for host in hosts:
            _kill_everything_in(host.ns)
        for host in hosts:
            _ip("netns", "del", host.ns, check=False)  # takes its end of the veth, and so the pair, with it
        _ip("link", "del", hosts[0].dev, check=False)  # the pair, if it never left this namespace


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MAX_RESTARTS", "TORCHRUN_ARGS", "NPROC")}
    return {**env, "OMP_NUM_THREADS": "1", "LOOM_PG_TIMEOUT_S": "60", **extra}


def _tail(path, n=4000):
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def _status(code):
    return f"exit {code}" if code is not None else f"killed, still running after {TIMEOUT_S} s or the other's failure"


def _run_nodes(hosts, commands, logs):
    """Start one command per host; return their exit codes, or kill them all past TIMEOUT_S."""
    procs = []
    try:
        for host, (cmd, env), log in zip(hosts, commands, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], cwd=ROOT, env=env,
                                              stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            # One node failing leaves the other waiting for it: stop both at once.
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        return [p.poll() for p in procs]
    finally:
        if any(p.poll() != 0 for p in procs):
            for host in hosts:
                _kill_everything_in(host.ns)
        for p in procs:
            p.wait(timeout=30)


def _steps(run_dir):
    return [(r["step"], r["loss"], r["grad_norm"])
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
def test_two_nodes_train_exactly_as_one(two_hosts, tmp_path):
    multi, single = tmp_path / "two_nodes", tmp_path / "one_node"
    nodes = []
    for rank, host in enumerate(two_hosts):
        cmd = ["bash", "launch/run_multinode.sh", "2", str(rank), two_hosts[0].addr, PORT,
               "--local-addr", host.addr, "--rdzv-conf", f"is_host={int(rank == 0)}",
               "--", *TRAIN, f"train.run_dir={multi}"]
        nodes.append((cmd, _env(NPROC_PER_NODE="2", GLOO_SOCKET_IFNAME=host.dev)))
    logs = [tmp_path / f"node{rank}.log" for rank in range(2)]
    codes = _run_nodes(two_hosts, nodes, logs)
    report = "\n".join(f"--- node {rank} ({_status(code)}) ---\n{_tail(log)}"
                       for rank, (code, log) in enumerate(zip(codes, logs)))
    assert codes == [0, 0], report
    assert "step 6/6" in logs[0].read_text(), report

    # The reference runs in a namespace as well, so that a hang is killed with all its workers.
    local = (["bash", "launch/run_local.sh", "4", *TRAIN, f"train.run_dir={single}"], _env())
    local_log = tmp_path / "one_node.log"
    (code,) = _run_nodes(two_hosts[:1], [local], [local_log])
    assert code == 0, f"--- one node ({_status(code)}) ---\n{_tail(local_log)}"

    # Ranks 2 and 3 logged from the second node, so the world spanned both.
    assert all((multi / f"metrics.rank{r}.jsonl").is_file() for r in (1, 2, 3)), sorted(os.listdir(multi))
    two, one = _steps(multi), _steps(single)
    assert [s for s, _, _ in two] == list(range(1, 7)), report
    assert two == one, "\n".join(f"step {a[0]}: two nodes loss {a[1]!r} grad_norm {a[2]!r}, "
                                 f"one node loss {b[1]!r} grad_norm {b[2]!r}" for a, b in zip(two, one))
