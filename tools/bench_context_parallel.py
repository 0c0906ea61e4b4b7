"""Context-parallel benchmark: (a) causal load balance of zigzag vs contiguous sharding over packed
documents (host only); (b) bytes sent by ring and Ulysses attention in a real run on gloo ranks,
against the formula.

    python tools/bench_context_parallel.py [--windows 16] [--seed 0] [--skip-comm]

(a) Documents with long-tailed lengths (lognormal, median ~700 tokens, a few of 100k+) are packed
into 32k / 64k / 128k windows (cut at window borders, as the loader does). The work of a rank is
the number of visible (q, k) pairs of its queries under causal attention (sum of position + 1),
which is also what ring attention computes: off-diagonal blocks are cut down to their visible
halves and blocks without any visible pair are skipped. Reported: max / mean over the CP ranks,
averaged and worst over the windows (1.00 is perfect balance).

(b) A tiny model (launch/configs/tiny_dense.yaml) runs one forward + backward under CP 2 and 4 on
spawned gloo ranks; the bytes each rank sent come from the model's CommStats.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from datetime import timedelta

import numpy as np
import torch

from loom import cli
from loom.parallel.cp_plan import ZigzagPlan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEQ_LENS = (32768, 65536, 131072)
CPS = (2, 4, 8)


# ----------------------------------------------------------------------------- (a) load balance


def packed_windows(seq_len: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` windows of ``seq_len`` tokens: each the document lengths (fragments) it holds."""
    lengths = []
    need = seq_len * count
    while sum(lengths) < need:
        lengths.extend(np.minimum(np.ceil(rng.lognormal(math.log(700), 1.6, size=1024)), 400_000).astype(int))
    stream = np.concatenate([[0], np.cumsum(lengths)])
    windows = []
    for w in range(count):
        start, end = w * seq_len, (w + 1) * seq_len
        cuts = stream[(stream > start) & (stream < end)]
        windows.append(np.diff(np.concatenate([[start], cuts, [end]])))
    return windows


def contiguous_work(doc_lens: np.ndarray, cp: int) -> np.ndarray:
    """Causal pairs per rank when rank r holds tokens [r*T/cp, (r+1)*T/cp)."""
    positions = np.concatenate([np.arange(n) for n in doc_lens]) + 1
    return positions.reshape(cp, -1).sum(1)


def zigzag_work(doc_lens: np.ndarray, cp: int) -> np.ndarray:
    cu = torch.tensor(np.concatenate([[0], np.cumsum(doc_lens)]), dtype=torch.int32)
    plan = ZigzagPlan(cu, cp, device="cpu")
    return np.array([plan.causal_pairs(r) for r in range(cp)])


def load_balance(windows_per_len: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    print("(a) causal attention work per rank, max/mean over CP ranks (1.00 = balanced)")
    print(f"    {windows_per_len} windows per length; doc lengths lognormal(median 700, sigma 1.6), capped at 400k")
    print(f"    {'seq_len':>8} {'docs/win':>8} {'cp':>3} | {'zigzag mean':>11} {'worst':>6} | "
          f"{'contiguous mean':>15} {'worst':>6}")
    for seq_len in SEQ_LENS:
        windows = packed_windows(seq_len, windows_per_len, rng)
        docs = np.mean([len(w) for w in windows])
        for cp in CPS:
            zig = [w.max() / w.mean() for w in (zigzag_work(d, cp) for d in windows)]
            con = [w.max() / w.mean() for w in (contiguous_work(d, cp) for d in windows)]
            print(f"    {seq_len:>8} {docs:>8.1f} {cp:>3} | {np.mean(zig):>11.3f} {np.max(zig):>6.3f} | "
                  f"{np.mean(con):>15.3f} {np.max(con):>6.3f}")


# ----------------------------------------------------------------------------- (b) bytes on the wire

COMM_SEQ_LEN = 256


def theory_bytes(mode: str, cp: int, t_local: int, hq: int, hkv: int, d: int, word: int, layers: int) -> dict:
    """Bytes one rank sends per step, from the shapes: see ring_attention.py and ulysses.py."""
    if mode == "ring":
        kv = 2 * t_local * hkv * d * word
        return {"ring_fwd": layers * (cp - 1) * kv, "ring_bwd_kv": layers * (cp - 1) * kv,
                "ring_bwd_dkv": layers * cp * 2 * t_local * hkv * d * 4}
    hkv_sent = hkv * cp // math.gcd(hkv, cp)
    local = (2 * hq + 2 * hkv_sent) * t_local * d * word  # q, k, v, out
    return {"ulysses_fwd": layers * (cp - 1) * local // cp, "ulysses_bwd": layers * (cp - 1) * local // cp}


def _measure(mode: str) -> tuple[dict, dict]:
    """On every rank: one forward + backward of the tiny model under CP; (measured, theory) bytes."""
    import torch.distributed as dist

    from loom.config import load_config
    from loom.data import PackedDataset, collate, synthetic_corpus
    from loom.model.decoder import build_model
    from loom.parallel.context_parallel import shard_microbatch
    from loom.parallel.mesh import ParallelDims, ParallelGroups
    from loom.parallel.parallelize import parallelize

    cp = dist.get_world_size()
    cfg = load_config(os.path.join(ROOT, "launch/configs/tiny_dense.yaml"),
                      [f"parallel.cp={cp}", f"parallel.cp_mode={mode}", "model.attn_backend=torch",
                       f"data.seq_len={COMM_SEQ_LEN}"])
    groups = ParallelGroups(ParallelDims(cp=cp), device=torch.device("cpu"), backend="gloo")
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), groups, cfg)
    data = PackedDataset(synthetic_corpus(cfg.model.vocab_size, 8 * COMM_SEQ_LEN, seed=0, min_doc_len=1,
                                          max_doc_len=90), COMM_SEQ_LEN)
    batch, labels = shard_microbatch(collate([data[0]]), cp, groups.cp_rank)
    logits = model.logits(batch)
    torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100).backward()
    stats = next(iter(model.layers.values())).attn.core.stats
    m = cfg.model
    theory = theory_bytes(mode, cp, COMM_SEQ_LEN // cp, m.num_heads, m.num_kv_heads, m.resolved_head_dim, 4,
                          m.num_layers)
    groups.destroy()
    return dict(stats.bytes), theory


def _worker(rank: int, world: int, store_path: str, results, mode: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        results.put((rank, _measure(mode)))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, mode: str) -> list:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world, os.path.join(tmp, "store"), results, mode), nprocs=world,
                           join=True, start_method="spawn")
    out = dict(results.get() for _ in range(world))
    return [out[r] for r in range(world)]


def comm_bytes() -> None:
    print(f"\n(b) bytes sent per rank, one forward + backward of tiny_dense (2 layers, seq_len {COMM_SEQ_LEN}, "
          "fp32, 4 q / 2 kv heads of 16), gloo")
    print(f"    {'mode':>8} {'cp':>3} {'kind':>13} | {'measured':>9} {'formula':>9} {'match':>5}")
    for cp in (2, 4):
        for mode in ("ring", "ulysses"):
            ranks = run_ranks(cp, mode)
            measured, theory = ranks[0]
            same = all(r == (measured, theory) for r in ranks)
            for kind in sorted(theory):
                ok = measured.get(kind) == theory[kind] and same
                print(f"    {mode:>8} {cp:>3} {kind:>13} | {measured.get(kind, 0):>9} {theory[kind]:>9} "
                      f"{'yes' if ok else 'NO':>5}")
            total = sum(measured.values())
            print(f"    {mode:>8} {cp:>3} {'total':>13} | {total:>9}")


@cli.entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=16, help="windows per sequence length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-comm", action="store_true", help="only the host-side load balance")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    load_balance(args.windows, args.seed)
    if not args.skip_comm:
        comm_bytes()


if __name__ == "__main__":
    main()
