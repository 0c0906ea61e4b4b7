"""The trainer: build everything from a Config, then run steps that read top to bottom."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import Config, save_config
from engine.data import GlobalBatchSampler, PackedDataset, load_token_file, rank_microbatches, synthetic_corpus
from engine.model.decoder import build_model
from engine.parallel import comm
from engine.parallel.data_parallel import GradBuffer
from engine.parallel.mesh import ParallelDims, ParallelGroups
from engine.parallel.parallelize import parallelize
from engine.parallel.tensor_parallel import vocab_parallel_cross_entropy
from engine.train.metrics import MetricsLogger
from engine.train.optim import build_optimizer, clip_grads, global_grad_norm, lr_at, set_lr


def build_groups(cfg: Config) -> ParallelGroups:
    world = dist.get_world_size()
    cfg.validate(world)
    p = cfg.parallel
    return ParallelGroups(ParallelDims(tp=p.tp, cp=p.cp, dp=cfg.dp_size(world), pp=p.pp))


def build_dataset(cfg: Config) -> PackedDataset:
    if cfg.data.source == "synthetic":
        corpus = synthetic_corpus(cfg.model.vocab_size, cfg.data.num_tokens, seed=cfg.train.seed)
    else:
        corpus = load_token_file(cfg.data.source)
    return PackedDataset(corpus, cfg.data.seq_len)


class Trainer:
    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg, self.groups = cfg, groups
        self.device = groups.device
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and layout
        model = build_model(cfg.model).to(self.device)
        self.model = parallelize(model, groups, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grads = GradBuffer(self.params, groups.dp_cp, groups.tp, cfg.parallel.bucket_size_mb)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.dataset = build_dataset(cfg)
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.global_batch_size, cfg.train.seed,
                                          shuffle=cfg.data.shuffle)
        self.step = 0
        self.metrics = MetricsLogger(Path(cfg.train.run_dir), enabled=groups.rank == 0)
        if groups.rank == 0:
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")

    # ------------------------------------------------------------------ one step

    def microbatches(self, step: int):
        """This rank's share of the global batch of ``step`` (the batch itself ignores the layout)."""
        indices = self.sampler.indices(step)
        mbs = rank_microbatches(self.dataset, indices, self.groups.dp_rank, self.cfg.dp_size(self.groups.world_size),
                                self.cfg.train.micro_batch_size)
        return [mb.to(self.device) for mb in mbs]

    def forward_backward(self, step: int, microbatches=None) -> tuple[torch.Tensor, int]:
        """Accumulate reduced gradients for ``step``; return (global mean loss, global loss tokens).

        ``microbatches`` replaces this rank's share of the step's batch (benchmarks, tools).
        """
        if microbatches is None:
            microbatches = self.microbatches(step)
        num_tokens = self._global_count(sum(mb.num_loss_tokens for mb in microbatches))
        loss_sum = torch.zeros((), device=self.device)
        self.grads.zero()
        for i, mb in enumerate(microbatches):
            self.grads.set_sync(i == len(microbatches) - 1)
            with self._autocast():
                logits = self.model(mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens,
                                    max_seqlen=mb.max_seqlen)
            loss = self.loss(logits, mb.labels).sum()
            (loss / num_tokens).backward()
            loss_sum += loss.detach()
        self.grads.finish()
        return comm.all_reduce(loss_sum, self.groups.dp_cp) / num_tokens, num_tokens

    def train_step(self) -> dict:
        start = time.perf_counter()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        loss, num_loss_tokens = self.forward_backward(self.step)
        grad_norm = self.optimizer_step(lr)
        self.step += 1
        elapsed = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        return {"step": self.step, "loss": float(loss), "grad_norm": float(grad_norm), "lr": lr,
                "tokens": tokens, "loss_tokens": num_loss_tokens, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed}

    def optimizer_step(self, lr: float) -> torch.Tensor:
        """Clip by the global norm, then step. Returns the norm before clipping."""
        grad_norm = global_grad_norm(self.params, self.groups.mp, self.groups.tp_rank)
        clip_grads(self.params, grad_norm, self.cfg.optim.clip_grad)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        return grad_norm

    def fit(self) -> list[dict]:
        history = []
        while self.step < self.cfg.train.steps:
            record = self.train_step()
            self.metrics.log(record, print_line=(self.step % self.cfg.train.log_interval == 0))
            history.append(record)
        self.metrics.close()
        return history

    # ------------------------------------------------------------------ helpers

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token fp32 loss ``[T]``; the logits may be this rank's vocabulary slice."""
        vocab_start = self.groups.tp_rank * logits.shape[-1]
        return vocab_parallel_cross_entropy(logits, labels, self.groups.tp, vocab_start)

    def _global_count(self, local: int) -> int:
        count = torch.tensor(float(local), device=self.device)
        return int(comm.all_reduce(count, self.groups.dp_cp).item())

    def _autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
