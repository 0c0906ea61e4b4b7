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


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_backend: str = "auto"  # auto | torch | triton | flash_attn

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}; "
                "set model.head_dim explicitly"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads={self.num_heads}")
        if self.attn_backend not in ("auto", "torch", "triton", "flash_attn"):
            raise ConfigError(f"model.attn_backend={self.attn_backend!r} is not one of auto, torch, triton, flash_attn")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass
class ParallelConfig:
    tp: int = 1
    sp: bool = False  # Megatron sequence parallelism over the TP group
    pp: int = 1
    cp: int = 1
    # dp is derived: world_size // (tp * pp * cp); set it only to assert the layout.
    dp: Optional[int] = None
    bucket_size_mb: float = 25.0  # DP gradient bucket size

    def validate(self) -> None:
        for key in ("tp", "pp", "cp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp=true needs parallel.tp > 1")


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | path to a .npy token file (with .idx.npy beside it)
    seq_len: int = 64
    num_tokens: int = 1 << 18  # size of the synthetic corpus
    shuffle: bool = True

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if self.source != "synthetic" and not Path(self.source).is_file():
            raise ConfigError(f"data.source={self.source!r}: no such token file")


@dataclass
class TrainConfig:
    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16
    global_batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 1  # sequences per microbatch per rank
    steps: int = 20
    run_dir: str = "runs/default"
    log_interval: int = 1
    device: str = "auto"  # auto | cpu | cuda

    def validate(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype={self.dtype!r} must be fp32 or bf16")
        for key in ("global_batch_size", "micro_batch_size", "steps", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} must be auto, cpu or cuda")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still reported)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
    if p.pp > 1:
        raise ConfigError(f"parallel.pp={p.pp}: pipeline parallelism is not implemented yet; use parallel.pp=1")
    if p.cp > 1:
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism is not implemented yet; use parallel.cp=1")
    per_step = dp * t.micro_batch_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"dp*train.micro_batch_size={dp}*{t.micro_batch_size}"
        )


# ----------------------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read YAML (if given), apply ``a.b=value`` overrides and build a typed Config.

    Types are checked here; cross-field rules wait for ``Config.validate(world_size)``.
    """
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level")
    for item in overrides or []:
        apply_override(raw, item)
    return build(Config, raw, prefix="")


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
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def build(cls, raw: Any, prefix: str):
    """Recursively turn a dict into dataclass ``cls``, rejecting unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
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


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
