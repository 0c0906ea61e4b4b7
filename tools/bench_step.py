"""Training-step time: Loom at world size 1, three ways, against Hugging Face ``LlamaForCausalLM``.

Same config, same weights, same tokens, on this machine's CPU (or GPU when present); every
variant runs one whole training step: forward, backward, gradient clipping and AdamW.

- ``hf``: transformers as its ``Trainer`` runs it: SDPA attention in fp32, ``use_cache=False``,
  the fused AdamW (``adamw_torch_fused``), clipping at 1.0.
- ``loom plain``: Loom's eager step with the loss computed as HF does, from the full ``[T, V]``
  logits with ``F.cross_entropy`` (a bench-only swap of the trainer's loss).
- ``loom fused``: Loom's eager step as it trains, the LM head fused into the loss (engine/train/loss.py).
- ``loom compile``: the same with ``train.compile``: every block through torch.compile.
- ``kernel floor``: not a training step, a bound: the step's matrix multiplies (forward, and both
  gradients of each) and attention kernels (forward and backward), back to back on preallocated
  tensors. Any implementation of this step on these kernels takes at least this long.

Each iteration runs every variant once, in an order rotated by one each iteration, so that drifts of
the machine load hit all variants alike; the warm-up iterations (compilation happens there) are not
timed. Reported: the median and fastest step time, and the ratio to HF both of medians and as the
median of the per-iteration ratios (each pair timed back to back); and the median CPU time of the
process with its ratio, which other processes on a shared machine disturb less (spinning OpenMP
threads count; ``OMP_WAIT_POLICY=PASSIVE`` leaves them out). A markdown table and a JSON file.

    python tools/bench_step.py [--layers 4 --hidden 512 --batch 4 --seq 256 --iters 20 --json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from loom import cli

VARIANTS = ("hf", "loom plain", "loom fused", "loom compile", "kernel floor")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed iterations (each runs every variant once)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", default=os.path.join("runs", "bench_step", "bench_step.json"))
    return p.parse_args(argv)


def loom_config(args, compile_: bool):
    from loom.config import Config

    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size = args.vocab, args.hidden, args.intermediate
    m.num_layers, m.num_heads, m.num_kv_heads = args.layers, args.heads, args.kv_heads
    cfg.data.seq_len, cfg.data.num_tokens = args.seq, args.seq * args.batch * 2
    cfg.train.global_batch_size = cfg.train.micro_batch_size = args.batch
    cfg.train.run_dir = os.path.join("runs", "bench_step")
    cfg.runtime.preflight = False  # one process: nothing to agree on
    cfg.train.compile = compile_
    cfg.optim.clip_grad = 1.0  # as HF's Trainer (max_grad_norm=1.0)
    return cfg


def build_loom(args, compile_: bool):
    from loom.train.trainer import Trainer, build_groups

    cfg = loom_config(args, compile_)
    return Trainer(cfg, build_groups(cfg))


def logits_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss as HF computes it: ``[T, V]`` logits, upcast, then cross-entropy (summed, as Loom's)."""
    from loom.model import surface

    logits = surface.language_model(model).lm_head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def build_hf(trainer, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from loom.model.hf import loom_to_hf_name

    m = trainer.cfg.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, rms_norm_eps=m.rms_norm_eps,
                         rope_theta=m.rope_theta, max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa", use_cache=False, torch_dtype=torch.float32)
    model = LlamaForCausalLM(config).to(device)
    state = {loom_to_hf_name(k): v for k, v in trainer.model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model.train()


def make_batch(args, device):
    from loom.data import Microbatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((args.batch, 1), -100)], dim=1)
    mb = Microbatch(
        input_ids=ids.reshape(-1), labels=labels.reshape(-1),
        positions=torch.arange(args.seq, dtype=torch.int32).repeat(args.batch),
        cu_seqlens=torch.arange(0, args.batch * args.seq + 1, args.seq, dtype=torch.int32),
        max_seqlen=args.seq, num_sequences=args.batch, num_loss_tokens=int((labels != -100).sum()),
    )
    return ids.to(device), mb.to(device)


def kernel_floor(args, device):
    """The step's matmuls and attention kernels alone (see the module docstring), as one callable."""
    b, s, h, f, v = args.batch, args.seq, args.hidden, args.intermediate, args.vocab
    hd, t = h // args.heads, args.batch * args.seq
    layer = [(h, args.heads * hd), (h, args.kv_heads * hd), (h, args.kv_heads * hd), (args.heads * hd, h),
             (h, f), (h, f), (f, h)]
    shapes = []  # (m, k, n): [m, k] @ [k, n]; each projection's forward, input gradient and weight gradient
    for k, n in layer * args.layers + [(h, v)]:
        shapes += [(t, k, n), (t, n, k), (n, t, k)]
    gen = torch.Generator().manual_seed(0)
    operands = [(torch.randn(m, k, generator=gen).to(device), torch.randn(k, n, generator=gen).to(device),
                 torch.empty(m, n, device=device)) for m, k, n in shapes]
    q = torch.randn(b, args.heads, s, hd, generator=gen).to(device).requires_grad_()
    kv = [torch.randn(b, args.kv_heads, s, hd, generator=gen).to(device).requires_grad_() for _ in range(2)]
    dout = torch.randn(b, args.heads, s, hd, generator=gen).to(device)

    def floor():
        for x, w, out in operands:
            torch.mm(x, w, out=out)
        for _ in range(args.layers):
            o = F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=args.heads != args.kv_heads)
            torch.autograd.grad(o, (q, *kv), dout)
    return floor


def step_functions(args, variants):
    """``{variant: one training step}``, each model checked against HF's logits first."""
    first = build_loom(args, compile_=False)
    device = first.device
    hf = build_hf(first, device)
    ids, mb = make_batch(args, device)
    # HF's Trainer defaults to the fused AdamW on torch >= 2.8 (optim="adamw_torch_fused"), as Loom uses.
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        hf(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)  # what HF's Trainer does by default
        hf_opt.step()

    def loom_step(trainer):
        def step():
            trainer.forward_backward(0, [mb])
            trainer.optimizer_step(1e-4)
        return step

    steps, diffs = {"hf": hf_step}, {}
    with torch.no_grad():
        reference = hf(input_ids=ids).logits
    for variant in variants:
        if variant == "hf":
            continue
        if variant == "kernel floor":
            steps[variant] = kernel_floor(args, device)
            continue
        trainer = first if variant == "loom fused" else build_loom(args, compile_=variant == "loom compile")
        if variant == "loom plain":
            trainer.loss = logits_loss
        with torch.no_grad():  # same model, same batch: the logits must agree before timing means anything
            diffs[variant] = (trainer.model(ids) - reference).abs().max().item()
        if diffs[variant] > 1e-3:
            raise RuntimeError(f"{variant} and HF logits differ by {diffs[variant]:.2e}; the comparison "
                               "would be meaningless")
        steps[variant] = loom_step(trainer)
    return {v: steps[v] for v in variants}, diffs, device


def time_rotated(steps: dict, iters: int, warmup: int, device) -> tuple[dict, dict]:
    """(wall, CPU) seconds per step of each variant over ``iters`` iterations after ``warmup``; iteration
    i runs the variants from the (i mod n)-th on, so each takes every place in the order equally often."""
    names = list(steps)
    wall, cpu = {name: [] for name in names}, {name: [] for name in names}
    for i in range(warmup + iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def summarize(wall: dict[str, list[float]], cpu: dict[str, list[float]], tokens: int) -> dict:
    """Per variant: median and fastest step, and the ratio to HF of the medians, of each iteration's pair
    (median and quartiles: these shrug off slow drifts of the machine) and of the median CPU times."""
    out = {}
    hf, hf_cpu = wall.get("hf"), cpu.get("hf")
    for name, ts in wall.items():
        median = statistics.median(ts)
        row = {"median_s": median, "min_s": min(ts), "max_s": max(ts), "tokens_per_s": tokens / median,
               "cpu_median_s": statistics.median(cpu[name]), "times_s": ts, "cpu_times_s": cpu[name]}
        if hf is not None and name != "hf":
            pairs = [a / b for a, b in zip(ts, hf)]
            q1, mid, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
            row.update(ratio=median / statistics.median(hf), pair_ratio=mid, pair_ratio_q1=q1, pair_ratio_q3=q3,
                       cpu_ratio=row["cpu_median_s"] / statistics.median(hf_cpu))
        out[name] = row
    return out


def table(summary: dict) -> str:
    lines = ["| variant | median step (ms) | fastest (ms) | tokens/s | / HF (medians) | / HF (per iteration: "
             "median [q1, q3]) | CPU time (ms) | / HF (CPU time) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in summary.items():
        ratio, cpu_ratio = (f"{row['ratio']:.3f}", f"{row['cpu_ratio']:.3f}") if "ratio" in row else ("1", "1")
        pairs = (f"{row['pair_ratio']:.3f} [{row['pair_ratio_q1']:.3f}, {row['pair_ratio_q3']:.3f}]"
                 if "pair_ratio" in row else "")
        lines.append(f"| {name} | {row['median_s'] * 1000:.1f} | {row['min_s'] * 1000:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {ratio} | {pairs} | {row['cpu_median_s'] * 1000:.1f} | "
                     f"{cpu_ratio} |")
    return "\n".join(lines)


@cli.entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from loom.parallel.mesh import init_distributed

    init_distributed()
    steps, diffs, device = step_functions(args, args.variants)
    wall, cpu = time_rotated(steps, args.iters, args.warmup, device)
    tokens = args.batch * args.seq
    summary = summarize(wall, cpu, tokens)
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}; batch {args.batch}x{args.seq} on {device.type}, {torch.get_num_threads()} threads; "
          f"{args.iters} timed iterations after {args.warmup} warm-up, variants in rotated order")
    print("logits max |Loom - HF| before timing: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    print(table(summary))
    record = {"args": vars(args), "device": device.type, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "logits_max_abs_diff": diffs, "variants": summary}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.json}")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
