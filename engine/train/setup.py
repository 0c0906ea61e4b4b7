"""Build one rank's share of a model without ever holding the whole of it.

1. The model is built on the meta device: shapes, no storage.
2. ``parallelize_stages`` cuts it into this rank's pipeline chunks and TP / EP shards, still on meta.
3. The GradBuffer allocates flat buckets for the trainable parameters on the real device (the
   parameters become views into them); frozen parameters and buffers get their own storage.
4. Every local tensor is filled with its initial values from (``train.seed``, its stable name, its
   place in the global tensor): see engine/model/init.py. The global weights are the same under
   every layout, and the peak during set-up is this rank's share plus one generator block.

On ``device="meta"`` steps 3-4 allocate nothing: a dry run of any rank of any layout
(tools/memory.py) reads the real shard shapes from what this builds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from loom.checkpoint.names import named_tensors
from loom.config import Config
from loom.model import surface
from loom.model.compile import apply_compile
from loom.model.init import fill_shard, init_rules
from loom.model.recompute import apply_recompute
from loom.parallel.data_parallel import place
from loom.parallel.expert_parallel import moe_wiring
from loom.parallel.mesh import ParallelGroups
from loom.parallel.parallelize import parallelize_stages
from loom.parallel.pipeline import Pipeline, join_chunks
from loom.parallel.sharding import global_runs
from loom.train.multimodal import build_any_model, freeze
from loom.train.optim import MixedPrecisionAdamW, build_optimizer


@dataclass
class RankModel:
    model: nn.Module  # every chunk under its world-size-1 names (not for forward under PP)
    chunks: list[nn.Module]  # this rank's pipeline chunks; [model] without PP
    pipeline: Optional[Pipeline]
    optimizer: MixedPrecisionAdamW  # .grads: the GradBuffer


def build_rank(cfg: Config, groups: ParallelGroups, dataset, device: torch.device) -> RankModel:
    """This rank's model chunks, pipeline, gradient buffers and optimizer, initialised (unless on meta)."""
    wiring = moe_wiring(groups, cfg)  # outside the meta device: its placement tables hold real values
    with torch.device("meta"):
        whole = build_any_model(cfg, dataset, wiring)
    rules = init_rules(whole, cfg.model.init_std)
    chunks = parallelize_stages(whole, groups, cfg)
    del whole
    model = join_chunks(chunks)
    freeze(model, cfg)  # after parallelize, which makes new Parameters
    apply_recompute(chunks, cfg.train.recompute, cfg.train.recompute_layers)
    if cfg.train.compile:  # last: it compiles what the recompute wrappers run (compile.py says why)
        apply_compile(chunks)
    for p in model.parameters():  # bf16 parameters; buffers (e.g. routing biases) stay fp32
        p.data = p.data.to(cfg.train.precision.params)
    pipeline = Pipeline([surface.language_model(c) for c in chunks], groups, cfg) if cfg.parallel.pp > 1 else None
    tied = (pipeline.tied_weight, pipeline.tied_group) if pipeline is not None else (None, None)
    reduce_dtype = cfg.optim.reduce_dtype
    optimizer = build_optimizer(model, cfg.optim, groups, distributed=cfg.distributed_optimizer(groups.world_size),
                                bucket_size_mb=cfg.parallel.bucket_size_mb, device=device, tied=tied,
                                reduce_dtype=reduce_dtype)
    if device.type != "meta":
        _allocate_rest([model, *chunks], device)
        initialize(chunks, rules, cfg)
        optimizer.masters_from_params()
    return RankModel(model, chunks, pipeline, optimizer)


def _allocate_rest(modules: list[nn.Module], device: torch.device) -> None:
    """Storage for what the GradBuffer did not place: frozen parameters and buffers."""
    for root in modules:
        for module in root.modules():
            for p in module.parameters(recurse=False):
                if p.is_meta:
                    place(p, torch.empty(p.shape, dtype=p.dtype, device=device))
            for key, b in module._buffers.items():
                if b is not None and b.is_meta:
                    module._buffers[key] = torch.empty(b.shape, dtype=b.dtype, device=device)


@torch.no_grad()
def initialize(chunks: list[nn.Module], rules: dict, cfg: Config) -> None:
    """Fill every local tensor with its initial values (a tied LM head with its embedding's)."""
    for name, tensor in named_tensors(chunks, cfg.model.tie_embeddings).items():
        shape, runs = global_runs(tensor)
        for first, n, offsets in runs:
            part = tensor.data if len(runs) == 1 else tensor.data[first:first + n]
            fill_shard(part, rules[name], cfg.train.seed, name, shape, offsets)
