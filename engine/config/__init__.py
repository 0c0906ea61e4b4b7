"""Typed run configuration: nested dataclasses loaded from YAML plus ``a.b=value`` overrides.

Every key has a default and unknown keys are rejected, so a typo never silently becomes a
default. ``Config.validate(world_size)`` runs before any process group or model is built and
names the offending key in its error.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from loom.config.errors import ConfigError
from loom.config.model import ModelConfig, MoEConfig, VisionConfig
from loom.config.run import (LORA_TARGETS, MOVED_KEYS, CheckpointConfig, DataConfig, FinetuneConfig, LoRAConfig,
                             OptimConfig, ParallelConfig, RuntimeConfig, TrainConfig, check_token_source, indexed_paths,
                             resolve_etp, token_index_path)

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, world_size: int) -> None:
        """Check every section, then the layout against ``world_size``. Raises ConfigError."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        check_layout(self, world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dp_size(self, world_size: int) -> int:
        p = self.parallel
        return world_size // (p.tp * p.pp * p.cp)

    def distributed_optimizer(self, world_size: int) -> bool:
        """``optim.distributed``, resolved: by default on wherever gradients are reduced over data parallel."""
        if self.optim.distributed is not None:
            return self.optim.distributed
        return self.dp_size(world_size) * self.parallel.cp > 1


def check_layout(cfg: Config, world_size: int) -> None:
    """Layout rules that tie the parallel section to the model, the data and the world size."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} != tp*pp*cp*dp: parallel.tp*parallel.pp*parallel.cp = "
            f"{p.tp}*{p.pp}*{p.cp} = {model_parallel} does not divide it"
        )
    dp = world_size // model_parallel
    if p.dp is not None and p.dp != dp:
        raise ConfigError(f"world size {world_size} != tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} (parallel.dp)")
    for key in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(m, key) % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide model.{key}={getattr(m, key)}")
    if p.sp and cfg.data.seq_len % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide data.seq_len={cfg.data.seq_len} (needed by parallel.sp)")
    if p.cp > 1:
        check_context_parallel(cfg)
    per_step = dp * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"dp*train.micro_batch_size={dp}*{t.micro_batch_size}"
        )
    if p.pp > 1:
        check_pipeline(cfg, dp)
    check_experts(cfg, dp)
    check_vision(cfg)
    check_lora(cfg)
    if m.attn_backend == "flash_attn" and t.dtype != "bf16":
        raise ConfigError(f"model.attn_backend=flash_attn needs train.dtype=bf16 (flash-attn computes in "
                          f"fp16/bf16 only), not train.dtype={t.dtype}; use triton or torch for fp32")


def check_vision(cfg: Config) -> None:
    """The vision tower is TP-sharded like the LLM and lives on the first pipeline stage."""
    p, v = cfg.parallel, cfg.model.vision
    if not v.enabled:
        if cfg.finetune.freeze:
            raise ConfigError(f"finetune.freeze={cfg.finetune.freeze} needs model.vision.enabled=true")
        return
    for key in ("num_heads", "intermediate_size"):
        if getattr(v, key) % p.tp:
            raise ConfigError(f"parallel.tp={p.tp} does not divide model.vision.{key}={getattr(v, key)}")
    if v.native_resolution and cfg.data.max_frames % v.temporal_patch_size:
        raise ConfigError(f"data.max_frames={cfg.data.max_frames} must be a multiple of "
                          f"model.vision.temporal_patch_size={v.temporal_patch_size}")


def check_lora(cfg: Config) -> None:
    """Each LoRA target must exist in this model."""
    m, targets = cfg.model, cfg.finetune.lora.target_modules if cfg.finetune.lora.rank else []
    missing = {"experts": m.moe.num_experts == 0, "shared_expert": not m.shared_expert_intermediate_size,
               "vision": not m.vision.enabled, "projector": not m.vision.enabled}
    for target in targets:
        if missing.get(target):
            raise ConfigError(f"finetune.lora.target_modules: {target!r} names no layer of this model")


def check_experts(cfg: Config, dp: int) -> None:
    """Expert parallelism folds over the ranks of one pipeline stage (Megatron's MoE parallel folding)."""
    p, m = cfg.parallel, cfg.model
    e, etp = m.moe.num_experts, p.resolved_etp
    if e == 0:
        if p.ep > 1 or etp != p.tp:
            raise ConfigError(f"parallel.ep={p.ep} / parallel.etp={p.etp} need model.moe.num_experts > 0")
        return
    if e % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.moe.num_experts={e}")
    if etp not in (1, p.tp):
        raise ConfigError(f"parallel.etp={etp} must be 1 or parallel.tp={p.tp}")
    if etp == p.tp and (dp * p.cp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide dp*cp={dp}*{p.cp}={dp * p.cp}")
    if etp == 1 and (p.tp * dp * p.cp) % p.ep:
        raise ConfigError(f"parallel.ep={p.ep} does not divide tp*dp*cp={p.tp}*{dp}*{p.cp} (parallel.etp=1)")
    if m.moe_intermediate_size % etp:
        raise ConfigError(f"parallel.etp={etp} does not divide model.moe.intermediate_size={m.moe_intermediate_size}")
    if m.moe.num_shared_experts and m.shared_expert_intermediate_size % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide the shared expert size "
                          f"{m.shared_expert_intermediate_size} (model.moe.num_shared_experts*intermediate_size)")
    if p.tp > 1 and not p.sp:
        # Megatron's rule too: the router and the dispatch run on each TP rank's token slice.
        raise ConfigError(f"model.moe.num_experts={e} with parallel.tp={p.tp} needs parallel.sp=true")


def stage_layout(layers: int, pp: int, vpp: int, layout: Optional[list[int]]) -> list[int]:
    """Layers per virtual stage (``parallel.pp_layout``, or an even split) over pp*vpp stages."""
    stages = pp * vpp
    if layout is None:
        if layers % stages:
            raise ConfigError(f"model.num_layers={layers} does not split evenly over parallel.pp*parallel.vpp="
                              f"{pp}*{vpp}={stages} stages; set parallel.pp_layout (layers per virtual stage)")
        return [layers // stages] * stages
    if len(layout) != stages or sum(layout) != layers:
        raise ConfigError(f"parallel.pp_layout={list(layout)} must list parallel.pp*parallel.vpp={stages} "
                          f"layer counts summing to model.num_layers={layers}")
    # Only the first and last stages may be empty: they still hold the embedding / the head.
    if min(layout) < 0 or 0 in layout[1:-1]:
        raise ConfigError(f"parallel.pp_layout={list(layout)}: every stage but the first and last needs >= 1 layer")
    return list(layout)


def check_pipeline(cfg: Config, dp: int) -> None:
    """The layer split over pp*vpp virtual stages, and enough microbatches to fill the pipeline."""
    p, t, layers = cfg.parallel, cfg.train, cfg.model.num_layers
    stage_layout(layers, p.pp, p.vpp, p.pp_layout)
    m = t.global_batch_size // (dp * t.micro_batch_size)
    where = (f"train.global_batch_size/(dp*train.micro_batch_size) = {t.global_batch_size}/({dp}*"
             f"{t.micro_batch_size}) = {m} microbatches per rank")
    if p.pp_schedule in ("1f1b", "zb1") and m < p.pp:
        raise ConfigError(f"{where}: parallel.pp_schedule={p.pp_schedule} needs at least parallel.pp={p.pp}")
    if p.pp_schedule == "interleaved" and m % p.pp:
        raise ConfigError(f"{where}: parallel.pp_schedule=interleaved needs a multiple of parallel.pp={p.pp}")
    # A compiled block's backward is one autograd node that computes input and weight gradients
    # together (and frees its buffers on the first call): zb1 could not split W out of it.
    if p.pp_schedule == "zb1" and t.compile:
        raise ConfigError("parallel.pp_schedule=zb1 with train.compile=true: a compiled block's backward cannot be "
                          "split into input and weight gradients; use parallel.pp_schedule=1f1b or train.compile=false")


def check_zigzag_length(length: int, cp: int, what: str) -> None:
    """Zigzag sharding cuts a sequence into 2*cp chunk slots of equal total size: no padding."""
    if length % (2 * cp):
        raise ConfigError(f"{what}={length} is not divisible by 2*parallel.cp={2 * cp} "
                          "(context parallelism splits each sequence into 2*cp zigzag chunks)")


def check_context_parallel(cfg: Config) -> None:
    """CP cuts every packed sequence into 2*cp zigzag chunk slots of equal total size (no padding)."""
    p, m, seq_len = cfg.parallel, cfg.model, cfg.data.seq_len
    check_zigzag_length(seq_len, p.cp, "data.seq_len")
    if p.sp and seq_len % (2 * p.cp * p.tp):
        raise ConfigError(f"data.seq_len={seq_len} is not divisible by 2*parallel.cp*parallel.tp="
                          f"{2 * p.cp * p.tp} (parallel.sp splits each CP shard over TP)")
    if p.cp_mode == "ulysses" and (m.num_heads // p.tp) % p.cp:
        raise ConfigError(f"parallel.cp_mode=ulysses needs model.num_heads/parallel.tp = {m.num_heads}/{p.tp} = "
                          f"{m.num_heads // p.tp} q heads per TP rank to be divisible by parallel.cp={p.cp}")
    if p.cp_mode == "ring" and m.attn_backend == "flash_attn":
        raise ConfigError("parallel.cp_mode=ring needs per-block kernels with a given lse, which "
                          "model.attn_backend=flash_attn lacks; use triton, torch or auto")


# ----------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (if given), apply ``a.b=value`` overrides and build a typed Config.

    Types are checked here; cross-field rules wait for ``Config.validate(world_size)``.
    """
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:  # missing, a directory, a binary file
            raise ConfigError(f"config file {path!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = build(Config, raw, prefix="")
    # model.pretrained replaces the model section: remember which keys were set, to check them against it
    cfg.model.explicit_keys = set(flat_keys(raw.get("model") or {}))
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (so 2, true, null, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None


def build(cls, raw: Any, prefix: str):
    """Recursively turn a dict into dataclass ``cls``, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    moved = [prefix + k for k in unknown if prefix + k in MOVED_KEYS]
    if moved:
        raise ConfigError(f"{moved[0]} is now {MOVED_KEYS[moved[0]]}: the train section was split into train, "
                          "checkpoint, runtime and finetune")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys under {where}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def coerce(tp, value: Any, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be {tp.__name__}, got bool")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} must be {tp.__name__}, got {type(value).__name__}")
    return value


def flat_keys(section: dict, prefix: str = "") -> dict:
    """A nested config dict (``Config.to_dict()`` or a part) as ``{"moe.top_k": value}``."""
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


__all__ = ["ConfigError", "ModelConfig", "MoEConfig", "VisionConfig", "LORA_TARGETS", "DataConfig", "LoRAConfig",
           "OptimConfig", "ParallelConfig", "TrainConfig", "CheckpointConfig", "RuntimeConfig", "FinetuneConfig",
           "MOVED_KEYS", "check_token_source", "indexed_paths", "resolve_etp",
           "token_index_path", "Config", "load_config", "save_config", "flat_keys", "build", "coerce", "stage_layout",
           "check_zigzag_length"]
