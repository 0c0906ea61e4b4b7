"""Calibrate the planner's cost model on this machine's CPU ranks, then check its predictions against real steps.

    python -m loom.tools.plan calibrate [--ranks 4] [--steps 6] [--out runs/plan_calibration.json]

1. Profile: ``--ranks`` processes (gloo, one thread each, as torchrun runs them) measure together: a
   512^3 fp32 matmul's rate per rank while every rank runs one (the peak), a small all_reduce after a small
   matmul, less the matmul (latency as a step sees it: every call waits for the slowest rank), a 4 MiB
   all_reduce (bus bandwidth, the intra- and inter-node figure alike: one host), an in-place add over
   32 MiB tensors (memory bandwidth, which the optimizer step is bound by), and the model's own
   forward + backward on one microbatch at two token counts, whose intercept is the per-layer overhead and
   whose slope the model's compute rate (efficiency = that rate over the matmul peak).
2. Predict each layout of the tiny Mixtral twin (GQA 4/2 so that tp 2 is valid, fp32, torch attention) with
   loom.tools.plan_costs.estimate and that profile, then run it under torchrun for ``--steps`` steps and take the
   median ``step_time_s`` without the first 2. Report Spearman's rank correlation (goal >= 0.8) and the
   median absolute relative error (goal <= 25%) and write all of it as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loom import cli
from loom.tools.plan_costs import HardwareProfile, Layout, estimate

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "launch/configs/models/tiny/mixtral_8x7b.yaml"
OVERRIDES = ["model.attn_backend=torch", "train.dtype=fp32", "model.num_kv_heads=2", "data.seq_len=128",
             "train.global_batch_size=16", "train.micro_batch_size=1", "runtime.device=cpu"]
# (tp, pp, vpp, cp, ep, etp) on 4 ranks; dp follows.
LAYOUTS = [(1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 2, 1), (1, 1, 1, 1, 4, 1), (2, 1, 1, 1, 2, 2), (1, 2, 1, 1, 1, 1),
           (1, 2, 1, 1, 2, 1), (2, 2, 1, 1, 1, 2), (1, 1, 1, 2, 1, 1), (2, 1, 1, 1, 1, 2)]


def _timed(fn, repeat: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_times(cfg, tokens: list[int]) -> list[float]:
    """Forward + backward seconds of the whole model on one document of each token count."""
    import torch

    from loom.model.decoder import build_model

    model = build_model(cfg.model)

    def step(n):
        ids = torch.randint(0, cfg.model.vocab_size, (1, n))
        model(ids).float().square().mean().backward()

    return [_timed(lambda n=n: step(n), 9) for n in tokens]


def _latency(a, b, one, rounds: int = 6, block: int = 20) -> float:
    """A collective between computations, as in a step, where it also waits for the slowest of the
    oversubscribed ranks: blocks of matmuls with and without a small all_reduce after each, alternated
    (ABAB) so that the machine's drift hits both alike; the median over rounds of the difference per call."""
    import torch.distributed as dist

    def run(with_collective: bool) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(block):
            a @ b
            if with_collective:
                dist.all_reduce(one)
        return time.perf_counter() - start

    diffs = []
    for i in range(rounds):
        order = (True, False) if i % 2 else (False, True)
        t = {w: run(w) for w in order}
        diffs.append((t[True] - t[False]) / block)
    return max(statistics.median(diffs), 0.0)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from loom.config import load_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    dist.barrier()
    matmul = _timed(lambda: a @ b, 20)
    one = torch.zeros(1)
    dist.barrier()
    latency = _latency(a, b, one)
    big = torch.zeros(2**20)
    dist.barrier()
    allreduce = _timed(lambda: dist.all_reduce(big), 10)
    x, y = torch.zeros(2**23), torch.ones(2**23)  # 32 MiB each: past the caches
    dist.barrier()
    stream = _timed(lambda: x.add_(y), 10)  # reads 64 MiB, writes 32 MiB
    cfg = load_config(str(ROOT / CONFIG), OVERRIDES)
    seq = cfg.data.seq_len
    dist.barrier()
    model = _model_times(cfg, [seq // 2, 4 * seq])
    dist.barrier()
    result = {"matmul_s": matmul, "latency_s": latency, "allreduce_4mib_s": allreduce, "stream_96mib_s": stream,
              "model_s": model,
              "model_tokens": [seq // 2, 4 * seq]}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


def measure_profile(ranks: int) -> tuple[HardwareProfile, dict]:
    """This host's profile, measured by ``ranks`` processes at once."""
    import socket

    import torch.multiprocessing as mp

    from loom.config import load_config
    from loom.train.flops import tokens_flops

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "profile.json")
        mp.spawn(_worker, args=(ranks, port, out), nprocs=ranks, join=True)
        per_rank = json.loads(Path(out).read_text())
    med = {k: statistics.median(r[k] for r in per_rank)
           for k in ("matmul_s", "latency_s", "allreduce_4mib_s", "stream_96mib_s")}
    peak = 2 * 512**3 / med["matmul_s"]
    bw = 2 * (ranks - 1) / ranks * 4 * 2**20 / max(med["allreduce_4mib_s"] - med["latency_s"], 1e-9)
    (t_small, t_big) = [statistics.median(r["model_s"][i] for r in per_rank) for i in range(2)]
    cfg = load_config(str(ROOT / CONFIG), OVERRIDES)
    small, big = per_rank[0]["model_tokens"]
    slope = (t_big - t_small) / (big - small)
    if slope <= 0:
        raise SystemExit(f"calibrate: the model's step took {t_small:.4f} s at {small} tokens and {t_big:.4f} s at "
                         f"{big}: too noisy to fit a compute rate (is another job loading the CPU?)")
    intercept = max(t_small - slope * small, 0.0)
    flops = tokens_flops(cfg.model, big, big).total - tokens_flops(cfg.model, small, small).total
    rate = flops / (t_big - t_small)
    profile = HardwareProfile(gpu_tflops=peak / 1e12, efficiency=min(rate / peak, 1.0), intra_node_gbps=bw / 1e9,
                              inter_node_gbps=bw / 1e9, gpus_per_node=ranks, latency_s=med["latency_s"],
                              layer_overhead_s=intercept / cfg.model.num_layers,
                              memory_gbps=96 * 2**20 / med["stream_96mib_s"] / 1e9)
    raw = {**med, "model_fwd_bwd_s": [t_small, t_big], "model_tokens": [small, big], "per_rank": per_rank}
    return profile, raw


def layout_of(spec, world: int) -> Layout:
    tp, pp, vpp, cp, ep, etp = spec
    return Layout(tp, pp, vpp, cp, ep, etp, world // (tp * pp * cp), "none")


def predict(lay: Layout, profile: HardwareProfile) -> float:
    from loom.config import load_config
    from loom.tools.plan_costs import layout_config

    world = lay.tp * lay.pp * lay.cp * lay.dp
    cfg = layout_config(load_config(str(ROOT / CONFIG), OVERRIDES), lay)
    cfg.validate(world)
    return estimate(cfg, lay, profile, per_slice=True).step_s  # gloo: a flat bucket moves slice by slice


def measure_step(lay: Layout, ranks: int, steps: int, run_dir: str) -> float:
    """Median step time of a real torchrun job of ``lay``, the first 2 steps excluded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "launch/train.py", "--config", CONFIG, *OVERRIDES, *lay.overrides(), f"train.steps={steps}",
           f"train.run_dir={run_dir}", "checkpoint.resume=none", "checkpoint.save_interval=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{lay.name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return statistics.median(r["step_time_s"] for r in rows[2:])


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


@cli.entry
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="runs/plan_calibration.json")
    args = parser.parse_args(argv)
    profile, raw = measure_profile(args.ranks)
    print("profile:", json.dumps({k: float(f"{v:.4g}") for k, v in profile.to_dict().items()}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(LAYOUTS):
            lay = layout_of(spec, args.ranks)
            predicted = predict(lay, profile)
            measured = measure_step(lay, args.ranks, args.steps, os.path.join(tmp, f"run{i}"))
            rows.append({"layout": lay.name, "predicted_s": predicted, "measured_s": measured,
                         "error": predicted / measured - 1})
            print(f"{lay.name:<36} predicted {predicted * 1e3:8.1f} ms  measured {measured * 1e3:8.1f} ms  "
                  f"error {rows[-1]['error']:+.0%}", flush=True)
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    mare = statistics.median(abs(r["error"]) for r in rows)
    print(f"Spearman {rho:.3f} (goal >= 0.8), median |relative error| {mare:.1%} (goal <= 25%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"profile": profile.to_dict(), "raw": raw, "config": CONFIG,
                                          "overrides": OVERRIDES, "layouts": rows, "spearman": rho,
                                          "median_abs_rel_error": mare}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
