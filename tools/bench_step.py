"""Training-step time: Loom at world size 1 against Hugging Face ``LlamaForCausalLM``.

Same config, same weights, same batch, on this machine's CPU (or GPU when present). Each side
runs forward + backward + AdamW step; the two are timed alternately (ABBA) so that machine noise
hits both alike, and the median is reported with the ratio Loom / HF (below 1.0: Loom is faster).

    python tools/bench_step.py [--layers 4 --hidden 512 --batch 4 --seq 256 --iters 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


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
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return p.parse_args(argv)


def build_loom(args, device):
    from engine.config import Config
    from engine.parallel.mesh import init_distributed
    from engine.train.trainer import Trainer, build_groups

    init_distributed()
    cfg = Config()
    m = cfg.model
    m.vocab_size, m.hidden_size, m.intermediate_size = args.vocab, args.hidden, args.intermediate
    m.num_layers, m.num_heads, m.num_kv_heads = args.layers, args.heads, args.kv_heads
    cfg.data.seq_len, cfg.data.num_tokens = args.seq, args.seq * args.batch * 2
    cfg.train.global_batch_size = cfg.train.micro_batch_size = args.batch
    cfg.train.run_dir = os.path.join("runs", "bench_step")
    cfg.optim.clip_grad = 1.0  # as HF's Trainer (max_grad_norm=1.0)
    return Trainer(cfg, build_groups(cfg))


def build_hf(trainer, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model.hf import loom_to_hf_name

    m = trainer.cfg.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, rms_norm_eps=m.rms_norm_eps,
                         rope_theta=m.rope_theta, max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)
    state = {loom_to_hf_name(k): v for k, v in trainer.model.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model


def make_batch(args, device):
    from engine.data import Microbatch

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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = build_loom(args, None)
    device = trainer.device
    hf = build_hf(trainer, device)
    ids, mb = make_batch(args, device)
    # HF's Trainer defaults to the fused AdamW on torch >= 2.8 (optim="adamw_torch_fused"), as Loom uses.
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    with torch.no_grad():  # same model, same batch: the logits must agree before timing means anything
        diff = (trainer.model(ids) - hf(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"Loom and HF logits differ by {diff:.2e}; the comparison would be meaningless")

    def loom_step():
        trainer.forward_backward(0, [mb])
        trainer.optimizer_step(1e-4)

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)  # what HF's Trainer does by default
        hf_opt.step()

    times = {"loom": [], "hf": []}
    steps = (("loom", loom_step), ("hf", hf_step))
    for i in range(args.warmup + args.iters):
        for name, fn in steps if i % 2 == 0 else steps[::-1]:  # ABBA: neither side always runs first
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    loom, hf_t = statistics.median(times["loom"]), statistics.median(times["hf"])
    # Each iteration times both sides back to back: the median of those pairwise ratios shrugs off
    # slow drifts of the machine that a ratio of two medians would not.
    pairs = [a / b for a, b in zip(times["loom"], times["hf"])]
    q1, pair_ratio, q3 = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
    tokens = args.batch * args.seq
    print(f"model: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}; batch {args.batch}x{args.seq} on {device.type}, {torch.get_num_threads()} threads")
    print(f"logits max |Loom - HF| before timing: {diff:.2e}")
    print(f"loom step (fwd+bwd+adamw): {loom * 1000:8.1f} ms  ({tokens / loom:,.0f} tok/s)")
    print(f"hf   step (fwd+bwd+adamw): {hf_t * 1000:8.1f} ms  ({tokens / hf_t:,.0f} tok/s)")
    print(f"ratio loom/hf: {loom / hf_t:.3f} (median of per-iteration ratios {pair_ratio:.3f}, "
          f"quartiles {q1:.3f}-{q3:.3f} over {len(pairs)} iterations)")
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
