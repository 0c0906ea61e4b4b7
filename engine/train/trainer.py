"""The trainer: build everything from a Config, then run steps that read top to bottom."""
from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import loom.faults as faults
from loom.config import Config, ConfigError, save_config
from loom.data import BadSampleError, BlendedDataset, PackedDataset, build_text_dataset, make_sampler, rank_microbatches
from loom.model import surface
from loom.model.batch import PackedBatch
from loom.model.lora import quantize_base
from loom.parallel import comm
from loom.parallel.context_parallel import shard_microbatch
from loom.parallel.expert_parallel import finish_moe_step
from loom.parallel.mesh import ParallelDims, ParallelGroups, default_device_and_backend, default_timeout
from loom.parallel.pipeline import StageOutput
from loom.parallel.watch import CollectiveWatch
from loom.train.activations import ActivationTracker
from loom.train.checkpoint import Checkpointer
from loom.train.init_from import resolve_pretrained
from loom.train.loss import lm_head_loss
from loom.train.flops import device_peak_tflops, step_flops
from loom.train.guard import NonFiniteGuard
from loom.train.metrics import HotExperts, MetricsLogger, Progress
from loom.train.memory import MemoryReport, report_rank
from loom.train.multimodal import (MultimodalDataset, build_multimodal_dataset, step_loader,
                                     with_images)
from loom.train.optim import lr_at
from loom.train.preflight import check_collectives, check_identity
from loom.train.resilience import StepWatchdog, StopSignal
from loom.train.setup import build_rank


def build_groups(cfg: Config) -> ParallelGroups:
    world = dist.get_world_size()
    resolve_pretrained(cfg)
    cfg.validate(world)
    if cfg.runtime.preflight:  # before any group: a rank with another layout would hang building them
        check_identity(cfg, Checkpointer(cfg).resume_path(warn=False))
    p = cfg.parallel
    device, _ = default_device_and_backend(cfg.runtime.device)
    dims = ParallelDims(tp=p.tp, cp=p.cp, dp=cfg.dp_size(world), pp=p.pp, ep=p.ep, etp=p.resolved_etp)
    return ParallelGroups(dims, device=device, timeout=default_timeout(cfg.runtime.collective_timeout_s))


def build_dataset(cfg: Config) -> PackedDataset | BlendedDataset | MultimodalDataset:
    """The training data, checked before any model exists: bad data is a ConfigError naming the key or file."""
    d = cfg.data
    try:
        if d.train_jsonl is not None:
            dataset, where = build_multimodal_dataset(cfg), f"data.train_jsonl={d.train_jsonl}"
        else:
            dataset = build_text_dataset(d, cfg.model.vocab_size, seed=cfg.train.seed)
            where = ("data.blend" if d.blend else f"data.num_tokens={d.num_tokens}" if d.source == "synthetic"
                     else f"data.source={d.source}")
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # the loaders name the file; launch/train.py reports a ConfigError cleanly
        raise ConfigError(str(e)) from e
    if len(dataset) < cfg.train.global_batch_size:  # the sampler would refuse it only after the model is built
        raise ConfigError(f"{where} gives {len(dataset)} sequence(s) of data.seq_len={d.seq_len} tokens, fewer than "
                          f"train.global_batch_size={cfg.train.global_batch_size}")
    return dataset


class Trainer:
    def __init__(self, cfg: Config, groups: ParallelGroups):
        self.cfg, self.groups = cfg, groups
        self.device = groups.device
        self.dataset = build_dataset(cfg)  # first: a VLM takes its <image> id from the data's tokenizer
        torch.manual_seed(cfg.train.seed)  # the RNG state runs continue from (and checkpoints restore)
        rank = build_rank(cfg, groups, self.dataset, self.device)  # only this rank's shards, ever
        self.chunks = rank.chunks  # this rank's pipeline stages; [model] without PP
        self.model = rank.model  # all of them, under their world-size-1 parameter names
        self.pipeline = rank.pipeline
        self.optimizer = rank.optimizer  # fp32 masters and Adam states, sharded with optim.distributed
        self.grads = self.optimizer.grads  # fp32 gradient buckets, reduced over data parallel
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sampler = make_sampler(self.dataset, cfg.train.global_batch_size, cfg.train.seed, shuffle=cfg.data.shuffle)
        self.batches = step_loader(cfg, self.dataset, self.sampler, groups)  # None: text
        self.checkpoints = Checkpointer(cfg)
        self.step = self.checkpoints.resume(self.model, self.optimizer)  # 0 unless checkpoint.resume finds one
        quantize_base(self.model, cfg.finetune.lora)  # QLoRA: this rank's final base weights, to NF4
        self.metrics = MetricsLogger(Path(cfg.train.run_dir), rank=groups.rank)
        self.peak_tflops = device_peak_tflops(self.device)  # None: MFU unknown (CPU, unlisted GPUs)
        self.hot_experts = HotExperts(cfg.runtime.hot_expert_share, cfg.runtime.hot_expert_steps)
        self.nonfinite = NonFiniteGuard(cfg.runtime.on_nonfinite, cfg.runtime.max_skipped_steps, groups.rank == 0)
        self.watch = CollectiveWatch(groups.rank, groups.name_of, groups.timeout.total_seconds())
        if groups.rank == 0:
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.train.run_dir) / "config.yaml")
        self.memory = self.memory_report()  # activations by formula until the first step measures them
        if groups.rank == 0:
            print(self.memory.format(), flush=True)
            self.memory.write(cfg.train.run_dir)

    # ------------------------------------------------------------------ one step

    def microbatches(self, step: int):
        """This rank's share of the global batch of ``step`` (the batch itself ignores the layout)."""
        if self.batches is not None:  # multimodal: made ahead by the DataLoader's workers
            return [mb.to(self.device) for mb in self._agreed(step)]
        share = (self.sampler.indices(step), self.groups.dp_rank, self.cfg.dp_size(self.groups.world_size),
                 self.cfg.train.micro_batch_size)
        return [mb.to(self.device) for mb in rank_microbatches(self.dataset, *share)]

    def _agreed(self, step: int):
        """``self.batches(step)``, or on every rank the same BadSampleError when any rank's share has a bad sample
        (``data.on_bad_sample=error``): a sample read mid-run is found by its own replica only, and the
        others would wait for it in a collective."""
        try:
            mbs, problem = self.batches(step), None
        except BadSampleError as e:
            mbs, problem = [], str(e)
        problem = comm.first_text(problem, None, self.device)
        if problem is not None:
            raise BadSampleError(problem)
        return mbs

    def forward_backward(self, step: int, microbatches=None) -> tuple[torch.Tensor, int]:
        """Accumulate reduced gradients for ``step``; return (global mean loss, global loss tokens).

        ``microbatches`` replaces this rank's share of the step's batch (benchmarks, tools).
        """
        if microbatches is None:
            microbatches = self.microbatches(step)
        num_tokens = self._global_count(sum(mb.num_loss_tokens for mb in microbatches))
        self.grads.zero()
        if self.pipeline is not None:
            return self._pipeline_forward_backward(microbatches, num_tokens)
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(microbatches):
            self.grads.set_sync(i == len(microbatches) - 1)
            batch, labels = self.model_inputs(mb)
            with self._autocast():
                hidden = self.model.hidden_states(batch)
            loss = self.loss(self.model, hidden, labels)
            (loss / num_tokens).backward()
            loss_sum += loss.detach()
        self.grads.finish()
        return comm.all_reduce(loss_sum, self.groups.dp_cp) / num_tokens, num_tokens

    def _pipeline_forward_backward(self, microbatches, num_tokens: int) -> tuple[torch.Tensor, int]:
        """forward_backward under PP: the schedule runs the stages, and every stage learns the loss."""
        shards = [self.model_inputs(mb) for mb in microbatches]
        forward = functools.partial(self._stage_forward, num_tokens=num_tokens)
        stats = self.pipeline.run(shards, forward, grad_sync=self.grads.set_sync)
        self.grads.finish()
        return comm.all_reduce(stats["loss_sum"], self.groups.dp_cp) / num_tokens, num_tokens

    def _stage_forward(self, chunk: int, hidden, shard, num_tokens: int) -> StageOutput:
        """Chunk ``chunk`` on one microbatch; ``hidden`` is the previous stage's output (None on the first)."""
        batch, labels = shard
        stage = self.chunks[chunk]
        if hidden is not None:
            batch = batch.with_hidden(hidden)
        with self._autocast():
            out = stage.hidden_states(batch)
        if surface.language_model(stage).lm_head is None:
            return StageOutput(out, None, {})
        loss = self.loss(stage, out, labels)
        return StageOutput(None, loss / num_tokens, {"loss_sum": loss.detach()})

    def train_step(self) -> dict:
        start = time.perf_counter()
        lr = lr_at(self.step, self.cfg.optim, self.cfg.train.steps)
        microbatches = self.microbatches(self.step)
        loss, num_loss_tokens = self.forward_backward(self.step, microbatches)
        grad_norm, applied = self.optimizer_step(lr, loss)
        moe = finish_moe_step(surface.language_model(self.model), self.cfg.model, self.device,  # {} for a dense model
                              update_bias=applied)
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_size * self.cfg.data.seq_len
        tflops = self.estimated_flops(microbatches) / elapsed / self.groups.world_size / 1e12
        return {"step": self.step, "loss": float(loss), "grad_norm": float(grad_norm), "lr": lr,
                "tokens": tokens, "loss_tokens": num_loss_tokens, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "tflops_per_rank": tflops,
                "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                "skipped": not applied, "skipped_steps": self.nonfinite.skipped, **moe}

    def estimated_flops(self, microbatches) -> float:
        """The step's model FLOPs (engine/train/flops.py), from this rank's documents taken dp times: the
        other replicas' document lengths are not known here. tools/bench_moe.py counts the global batch."""
        docs = [int(n) for mb in microbatches for n in torch.diff(mb.cu_seqlens.cpu()).tolist()]
        dp = self.cfg.dp_size(self.groups.world_size)
        return step_flops(self.cfg.model, docs * dp, recompute=self.cfg.train.recompute).total

    def optimizer_step(self, lr: float, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """Clip by the global norm, then step, unless the loss or the norm is not finite
        (``runtime.on_nonfinite``). Returns (the norm before clipping, whether the step was applied)."""
        grad_norm = self.optimizer.grad_norm()
        loss_value = 0.0 if loss is None else float(loss)
        if self.nonfinite.skips(self.step + 1, loss_value, float(grad_norm)):
            return grad_norm, False
        self.optimizer.clip(grad_norm, self.cfg.optim.clip_grad)
        self.optimizer.step(lr)
        return grad_norm, True

    def fit(self, until: int | None = None) -> list[dict]:
        """Train to step ``until`` (default ``train.steps``, which alone sets the LR schedule), or to the
        end of the step in which SIGTERM arrived on any rank (then save, and return)."""
        history, last = [], self.cfg.train.steps if until is None else until
        self.metrics.progress = Progress(self.cfg.train.steps, first_step=self.step) if self.groups.rank == 0 else None
        stacks = Path(self.cfg.train.run_dir) / f"stacks.rank{self.groups.rank}.txt"
        with self.watch, StepWatchdog(self.cfg.runtime.step_timeout_s, stacks) as watchdog, \
                StopSignal(self.groups.rank) as stop:
            if self.cfg.runtime.preflight and self.step < last:
                self.preflight()
            while self.step < last:
                self.watch.begin_step(self.step + 1)
                faults.at_step(self.groups.rank, self.step + 1)
                watchdog.arm()
                record = self.train_step() if history else self.measured_step()
                watchdog.disarm()
                self.log(record)
                history.append(record)
                stopping = comm.any_rank(stop.requested, None, self.device)
                if stopping or self.checkpoints.should_save(self.step):
                    self.checkpoints.save(self.step, self.model, self.optimizer)
                if stopping:
                    break
        if self.checkpoints.should_save(self.step, final=True):
            self.checkpoints.save(self.step, self.model, self.optimizer)
        self.metrics.close()
        return history

    def log(self, record: dict) -> None:
        record["restart"] = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun --max-restarts
        if self.cfg.train.log_samples:
            record["samples"] = self.sampler.indices(record["step"] - 1).tolist()
        self.metrics.log(record, print_line=(self.step % self.cfg.train.log_interval == 0))
        for warning in self.hot_experts.update(record) if self.groups.rank == 0 else ():
            print(warning, flush=True)

    def preflight(self) -> None:
        """Check that every rank would issue the same collectives in the next step (engine/train/preflight.py)."""
        # Read outside the dry run, whose collectives send nothing: a bad sample must end every rank alike.
        microbatches = self.microbatches(self.step)

        def dry_step():
            self.forward_backward(self.step, microbatches)
            self.optimizer.grad_norm()
            finish_moe_step(surface.language_model(self.model), self.cfg.model, self.device, update_bias=False)

        check_collectives(dry_step, self.groups.names_by_ranks())
        self.grads.zero()

    # ------------------------------------------------------------------ helpers

    def memory_report(self, activations: int | None = None) -> MemoryReport:
        return report_rank(self.cfg, self.groups, self.model, self.optimizer, activations)

    def measured_step(self) -> dict:
        """The first step of a run, with its activations measured (on CUDA the allocator's peak above
        the state; elsewhere the tensors kept for backward, per microbatch); rank 0 rewrites the report."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        tracker = ActivationTracker(exclude=[b.param_data for b in self.grads.buckets])
        with contextlib.nullcontext() if cuda else tracker:
            record = self.train_step()
        if cuda:
            held = self.memory.params_bytes + self.memory.grads_bytes + self.memory.optimizer_bytes
            measured = max(0, torch.cuda.max_memory_allocated(self.device) - held)
        else:
            measured = tracker.peak
        self.memory = self.memory_report(activations=measured)
        if self.groups.rank == 0:
            self.memory.write(self.cfg.train.run_dir)
        return record

    def loss(self, model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed fp32 loss of the last stage's final hidden states: its LM head (vocabulary-split
        under TP) runs inside the loss, so no ``[tokens, vocab]`` logits are ever built."""
        head = surface.language_model(model).lm_head
        return lm_head_loss(head, hidden, labels, compute_dtype=self.cfg.train.precision.compute)

    def model_inputs(self, mb) -> tuple[PackedBatch, torch.Tensor]:
        """(model input, labels) of this rank: under CP, its zigzag shard."""
        cp = comm.group_size(self.groups.cp)
        if cp > 1:
            batch, labels = shard_microbatch(mb, cp, self.groups.cp_rank)
        else:
            batch = PackedBatch(input_ids=mb.input_ids, positions=mb.positions, cu_seqlens=mb.cu_seqlens,
                                max_seqlen=mb.max_seqlen)
            labels = mb.labels
        return with_images(self.model, batch, mb), labels

    def _global_count(self, local: int) -> int:
        # Every CP (and TP) rank of a DP replica holds the same microbatches: count over dp only.
        count = torch.tensor(float(local), device=self.device)
        return int(comm.all_reduce(count, self.groups.dp).item())

    def _autocast(self):
        compute = self.cfg.train.precision.compute
        return torch.autocast(self.device.type, dtype=compute) if compute is not None else contextlib.nullcontext()
