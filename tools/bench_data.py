"""Multimodal data loading: the step loader alone, and what real loading costs a training step.

    python tools/bench_data.py [--data data/vqa_demo] [--workers 0 1 2] [--step-workers 1 2] [--threads 1]
                               [--steps 10 --warmup 3 --rounds 2]
    loom-bench data

The data is the quick-start set (tools/make_synthetic_vqa.py, 10000 samples of 32x32 images, and its
tokenizer), made under ``--data`` unless it is there already. Two parts, in one process at world size 1:

1. The loader alone (engine/data/loader.py): this rank's whole step batches of
   launch/configs/demo_vlm_moe.yaml (32 sequences of 64 tokens per step, read, tokenized, decoded
   and collated) taken one after the other with nothing else running, for each ``--workers``
   count. Samples/s and tokens/s count real samples and their tokens, not padding.
2. The demo config's training step (world size 1: tp, sp and ep off, one microbatch of 32
   sequences, as tests/test_demo_learns.py runs it) with batches made by ``--step-workers``
   DataLoader workers during the steps (one mode per count), against the same steps with every
   microbatch made before the timer starts (and, for reference, with each batch made in the
   training process when its step asks). ``--threads`` sets the training process's torch threads:
   on a 2-core machine, 2 compute threads leave the workers no core of their own.
   Both run the same step numbers, so the same batches; the first ``--warmup`` steps of each
   block (worker start-up included) are not timed, and blocks alternate over ``--rounds``.
   The model keeps training from block to block: a step's cost does not depend on its weights.

Prints markdown tables (median [min, max] per step) and writes ``OUT/bench_data.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from loom import cli

CONFIG = str(Path(__file__).resolve().parents[1] / "launch/configs/demo_vlm_moe.yaml")
WORLD1 = ["parallel.tp=1", "parallel.sp=false", "parallel.ep=1", "train.micro_batch_size=32"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/vqa_demo", help="made as launch/quickstart.sh does when missing")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader part: worker counts")
    p.add_argument("--loader-steps", type=int, default=20, help="loader part: timed steps per worker count")
    p.add_argument("--step-workers", type=int, nargs="+", default=[2],
                   help="step part: data.num_workers of real loading (one mode each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the training process (default: torch's)")
    p.add_argument("--steps", type=int, default=10, help="step part: timed steps per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each block")
    p.add_argument("--rounds", type=int, default=2, help="step part: blocks per mode, alternating")
    p.add_argument("--out", default="runs/bench_data")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value for the step part")
    return p.parse_args(argv)


def demo_data(args) -> dict:
    from loom.tools.make_synthetic_vqa import make_synthetic_vqa
    from loom.tools.train_tokenizer import train_tokenizer

    root = Path(args.data)
    if not (root / "eval.jsonl").is_file():
        make_synthetic_vqa(root, n_train=args.train_samples, n_eval=400, image_size=32)
    if not (root / "tok.model").is_file():
        train_tokenizer([str(root / "train.jsonl")], str(root / "tok"), vocab_size=256)
    return {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "tok": str(root / "tok.model")}


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# ----------------------------------------------------------------------------- 1. the loader alone


def bench_loader(cfg, workers: int, steps: int, warmup: int) -> dict:
    from loom.data import GlobalBatchSampler, StepBatches, StepLoader
    from loom.train.multimodal import build_multimodal_dataset

    cfg.data.num_workers = workers
    dataset = build_multimodal_dataset(cfg)
    sampler = GlobalBatchSampler(len(dataset), cfg.train.global_batch_size, cfg.train.seed)
    loader = StepLoader(StepBatches(dataset, sampler, 0, 1, cfg.train.micro_batch_size), workers, cfg.data.prefetch)
    times, cpu = [], []
    for step in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.thread_time()
        loader(step)
        times.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    loader.close()
    timed = range(warmup, warmup + steps)
    docs = [dataset.plan.sequence(int(s)) for k in timed for s in sampler.indices(k)]
    samples, tokens, total = sum(map(len, docs)), int(sum(dataset.lengths[d].sum() for d in docs)), sum(times[warmup:])
    # CPU of this thread per step: with 0 workers the whole cost of making a step, else what receiving it costs
    return {"workers": workers, "step_s": spread(times[warmup:]), "cpu_s": spread(cpu[warmup:]),
            "samples_per_s": samples / total,
            "tokens_per_s": tokens / total, "samples": samples, "tokens": tokens}


# ----------------------------------------------------------------------------- 2. the training step


def timed_block(trainer, first: int, count: int, warmup: int, prepared=None) -> dict:
    """Steps first .. first+count-1 from ``trainer.batches`` (or ``prepared``): per timed step, its time
    the part spent waiting for its batch, and the training thread's CPU time in that wait."""
    waits, cpus, step_times = [], [], []
    fetch = prepared.__getitem__ if prepared is not None else trainer.microbatches

    def timed_fetch(step):
        start, start_cpu = time.perf_counter(), time.thread_time()
        out = fetch(step)
        waits.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - start_cpu)
        return out

    trainer.microbatches = timed_fetch  # train_step asks for its batch through this attribute
    trainer.step = first
    try:
        for _ in range(count):
            step_times.append(trainer.train_step()["step_time_s"])
    finally:
        del trainer.microbatches
    return {"step_s": step_times[warmup:], "wait_s": waits[warmup:], "wait_cpu_s": cpus[warmup:]}


def bench_steps(trainer, args) -> dict:
    """Modes ``loading_W`` (W in ``--step-workers`` workers), ``in_process`` (num_workers 0: each batch made
    when its step asks) and ``prepared``, block after block, the order reversed every other round."""
    from loom.data import StepLoader

    count, first = args.warmup + args.steps, 0
    steps = trainer.batches.steps
    workers = {**{f"loading_{w}": w for w in args.step_workers}, "in_process": 0}
    modes = {mode: {"step_s": [], "wait_s": [], "wait_cpu_s": []} for mode in (*workers, "prepared")}
    for r in range(args.rounds):
        for mode in list(modes) if r % 2 == 0 else list(modes)[::-1]:
            if mode in workers:
                trainer.batches = StepLoader(steps, workers[mode], trainer.cfg.data.prefetch)
                block = timed_block(trainer, first, count, args.warmup)
            else:
                trainer.batches = StepLoader(steps, 0)  # made here, before the timer, then handed over
                prepared = {s: trainer.microbatches(s) for s in range(first, first + count)}
                block = timed_block(trainer, first, count, args.warmup, prepared)
            trainer.batches.close()  # no worker left running into the next block
            for key in block:
                modes[mode][key] += block[key]
    out = {mode: {**{key: spread(v[key]) for key in v}, "steps": len(v["step_s"])} for mode, v in modes.items()}
    for mode in workers:
        out[mode]["ratio"] = out[mode]["step_s"]["median"] / out["prepared"]["step_s"]["median"]
    return out


# ----------------------------------------------------------------------------- report


def fmt(s: dict, scale: float = 1e3) -> str:
    return f"{s['median'] * scale:.1f} [{s['min'] * scale:.1f}, {s['max'] * scale:.1f}]"


def report(result: dict) -> str:
    lines = ["| loader: num_workers | ms per step | main-thread CPU ms per step | samples/s | tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["loader"]:
        lines.append(f"| {r['workers']} | {fmt(r['step_s'])} | {fmt(r['cpu_s'])} | {r['samples_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} |")
    steps, load = result["steps"], result["load_average"]
    lines += ["", f"| demo step ({steps['prepared']['steps']} timed steps per mode, {result['threads']} torch "
                  "threads) | ms per step | ms waiting for the batch | CPU ms of that wait | step / prepared |",
              "| --- | --- | --- | --- | --- |"]
    names = {**{f"loading_{w}": f"real loading, {w} workers" for w in result["step_workers"]},
             "in_process": "real loading, in process", "prepared": "prepared in advance"}
    for mode, name in names.items():
        s = steps[mode]
        ratio = f"{s['ratio']:.3f}" if "ratio" in s else "1"
        lines.append(f"| {name} | {fmt(s['step_s'])} | {fmt(s['wait_s'])} | {fmt(s['wait_cpu_s'])} | {ratio} |")
    lines.append(f"\n{result['cpus']} CPUs, load average {load['start'][0]:.1f} at the start, "
                 f"{load['end'][0]:.1f} at the end")
    return "\n".join(lines)


@cli.entry
def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from loom.config import load_config
    from loom.parallel.mesh import init_distributed
    from loom.train.trainer import Trainer, build_groups

    load_config(CONFIG, [*WORLD1, *args.overrides])  # a bad key fails before any data is made
    data = demo_data(args)
    overrides = [*WORLD1, f"data.train_jsonl={data['train']}", f"data.eval_jsonl={data['eval']}",
                 f"data.tokenizer={data['tok']}", f"train.run_dir={args.out}/run", "checkpoint.save_interval=0",
                 "checkpoint.resume=none", "runtime.preflight=false", "data.image_backend=pillow", *args.overrides]
    cfg = load_config(CONFIG, overrides)
    load_start = os.getloadavg()
    result = {"config": CONFIG, "overrides": overrides, "cpus": os.cpu_count(), "step_workers": args.step_workers,
              "loader": [bench_loader(load_config(CONFIG, overrides), w, args.loader_steps, args.warmup)
                         for w in args.workers]}
    if args.threads:
        torch.set_num_threads(args.threads)
    result["threads"] = torch.get_num_threads()
    cfg.data.num_workers = max(args.step_workers)
    cfg.train.steps = max(cfg.train.steps, args.warmup + args.steps)
    init_distributed(device=cfg.runtime.device)
    trainer = Trainer(cfg, build_groups(cfg))
    result["steps"] = bench_steps(trainer, args)
    result["load_average"] = {"start": load_start, "end": os.getloadavg()}  # other processes on this machine
    text = report(result)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_data.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {Path(args.out) / 'bench_data.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
